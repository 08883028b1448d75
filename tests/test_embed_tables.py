"""Table inputs whose image cells are paths, bytes or {bytes, path} structs (parquet, Arrow,
CSV, a folder written by Hugging Face datasets itself), --enable-metadata, img2dataset's
sidecar layout, compressed shards and dotted sample keys, and the progress of tar jobs."""

import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastclip.embed import embed

from embed_helpers import (
    assert_rows_equal,
    image_bytes,
    read_failures,
    read_output,
    tiny_checkpoint,
    write_tar_shard,
)
from servers import needed

OPTIONS = dict(model=tiny_checkpoint(), progress=False, num_workers=0, dtype="fp32")
# The same images in batches of other sizes: fp32 products round differently.
BATCHING = 2e-6


def _images(tmp_path, count=5):
    """``count`` encoded images written to a folder, and their bytes, in order."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    data = [image_bytes(10 + i, (30 + 3 * i, 44 - i), format="PNG" if i % 2 else "JPEG")
            for i in range(count)]
    for i, encoded in enumerate(data):
        (folder / f"{i}.img").write_bytes(encoded)
    return folder, data


def _reference(tmp_path, folder, count):
    """The rows of the same images read as files, by image index."""
    (tmp_path / "paths.txt").write_text("".join(f"{folder}/{i}.img\n" for i in range(count)))
    embed(str(tmp_path / "reference"), images=[str(tmp_path / "paths.txt")], **OPTIONS)
    return {int(os.path.basename(key).split(".")[0]): row
            for key, row in read_output(tmp_path / "reference").items()}


def _by_row(rows):
    return {int(key.rpartition(":")[2]): row for key, row in rows.items()}


def _metadata(folder):
    return pq.read_table(os.path.join(folder, "metadata")).to_pydict()


@pytest.mark.parametrize("layout", ["binary", "large_binary", "struct", "struct_paths",
                                    "arrow_file", "arrow_stream", "csv_paths"])
def test_image_cells_of_every_kind_give_the_rows_of_the_files(tmp_path, layout):
    folder, data = _images(tmp_path)
    expected = _reference(tmp_path, folder, len(data))
    paths = [f"images/{i}.img" for i in range(len(data))]
    if layout in ("binary", "large_binary"):
        column = pa.array(data, getattr(pa, layout)())
    elif layout == "struct_paths":  # datasets' Image feature for files: bytes null, a path
        column = pa.array([{"bytes": None, "path": p} for p in paths])
    else:
        column = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(data)])
    table = pa.table({"image": column, "caption": [f"c{i}" for i in range(len(data))]})
    path = tmp_path / {"arrow_file": "t.arrow", "arrow_stream": "t.arrow",
                       "csv_paths": "t.csv"}.get(layout, "t.parquet")
    if layout == "arrow_file":
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)
    elif layout == "arrow_stream":
        with pa.ipc.new_stream(str(path), table.schema) as writer:
            writer.write_table(table)
    elif layout == "csv_paths":
        path.write_text("image,caption\n" + "".join(f"{p},c{i}\n" for i, p in enumerate(paths)))
    else:
        pq.write_table(table, path, row_group_size=2)  # rows read across row groups
    embed(str(tmp_path / "out"), images=[str(path)], image_column="image", shard_size=3,
          batch_size=2, embed_captions=True, **OPTIONS)
    assert_rows_equal(_by_row(read_output(tmp_path / "out")), expected, BATCHING)
    metadata = _metadata(tmp_path / "out")
    assert metadata["caption"] == [f"c{i}" for i in range(len(data))]
    assert all(isinstance(p, str) for p in metadata["image_path"])
    if layout == "struct":
        assert metadata["image_path"] == [f"{i}.jpg" for i in range(len(data))]


def test_bad_cells_fail_with_short_reasons_and_a_wrong_column_type_is_refused(tmp_path):
    table = pa.table({"image": pa.array([image_bytes(1), b"\x00" * 5000, None, b""],
                                        pa.binary()), "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "t.parquet")
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "t.parquet")],
                    image_column="image", **OPTIONS)
    assert summary["rows"] == 1 and summary["failures"] == 3
    reasons = read_failures(tmp_path / "out")
    assert all(len(reason) < 300 and "\\x00" not in reason for reason in reasons.values()), \
        reasons
    assert "empty cell" in reasons[f"{tmp_path / 't.parquet'}:2"]
    with pytest.raises(ValueError, match="holds int64, not images"):
        embed(str(tmp_path / "out2"), images=[str(tmp_path / "t.parquet")], image_column="n",
              **OPTIONS)


def test_a_folder_written_by_datasets_is_a_table_and_a_dataset_dict_names_its_splits(tmp_path):
    datasets = needed("datasets")
    folder, data = _images(tmp_path, 4)
    expected = _reference(tmp_path, folder, len(data))
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "score": datasets.Value("float32")})
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in data],
         "text": [f"t{i}" for i in range(4)], "score": [0.5 * i for i in range(4)]},
        features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    embed(str(tmp_path / "out"), images=[str(tmp_path / "saved")], image_column="image",
          text_column="text", embed_captions=True, enable_metadata=True, **OPTIONS)
    assert_rows_equal(_by_row(read_output(tmp_path / "out")), expected, BATCHING)
    metadata = pq.read_table(tmp_path / "out" / "metadata")
    assert metadata.column("score").type == pa.float32()  # the table's own type
    assert metadata.column("score").to_pylist() == [0.0, 0.5, 1.0, 1.5]
    assert "text" not in metadata.column_names  # the caption column is "caption"

    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="DatasetDict; give one of its splits"):
        embed(str(tmp_path / "out2"), images=[str(tmp_path / "dict")], image_column="image",
              **OPTIONS)


def test_enable_metadata_carries_table_columns_with_their_types(tmp_path):
    folder, data = _images(tmp_path, 3)
    table = pa.table({"image_path": [f"images/{i}.img" for i in range(3)],
                      "url": [f"http://x/{i}" for i in range(3)],
                      "width": pa.array([10, 20, 30], pa.int32()),
                      "nsfw": [0.1, None, 0.3]})
    pq.write_table(table, tmp_path / "t.parquet")
    embed(str(tmp_path / "out"), images=[str(tmp_path / "t.parquet")], enable_metadata=True,
          **OPTIONS)
    metadata = pq.read_table(tmp_path / "out" / "metadata")
    assert metadata.column_names[:3] == ["key", "image_path", "caption"]
    assert metadata.column("url").to_pylist() == [f"http://x/{i}" for i in range(3)]
    assert metadata.column("width").type == pa.int32()
    assert metadata.column("nsfw").to_pylist() == [0.1, None, 0.3]
    embed(str(tmp_path / "plain"), images=[str(tmp_path / "t.parquet")], **OPTIONS)
    assert pq.read_table(tmp_path / "plain" / "metadata").column_names == [
        "key", "image_path", "caption"]


def test_a_shards_json_fields_become_metadata(tmp_path):
    samples = [(f"{i:03d}", {"jpg": image_bytes(i), "json": json.dumps(
        {"url": f"u{i}", "width": i, "key": "not this one"}).encode()}) for i in range(3)]
    samples.append(("003", {"jpg": image_bytes(3), "json": b"not json"}))
    write_tar_shard(tmp_path / "s.tar", samples)
    embed(str(tmp_path / "out"), images=[str(tmp_path / "s.tar")], enable_metadata=True,
          **OPTIONS)
    metadata = _metadata(tmp_path / "out")
    assert metadata["url"] == ["u0", "u1", "u2", None]
    assert metadata["width"] == [0, 1, 2, None]
    assert metadata["key"][0].endswith("s.tar:000")  # fastclip's own columns win


def test_img2dataset_layout_reads_captions_and_json_beside_the_images(tmp_path):
    root = tmp_path / "downloaded" / "00000"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"00000000{i}.jpg").write_bytes(image_bytes(i))
        (root / f"00000000{i}.txt").write_text(f"caption {i}\n")
        (root / f"00000000{i}.json").write_text(json.dumps({"caption": f"json {i}",
                                                            "width": 7 + i}))
    (root / "000000003.jpg").write_bytes(image_bytes(3))  # no sidecar: no text
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "downloaded")],
                    embed_captions=True, enable_metadata=True, **OPTIONS)
    assert summary["rows"] == 3 and summary["failures"] == 1
    metadata = _metadata(tmp_path / "out")
    assert metadata["caption"] == [f"caption {i}" for i in range(3)]
    assert metadata["width"] == [7, 8, 9]
    assert "no text" in next(iter(read_failures(tmp_path / "out").values()))
    embed(str(tmp_path / "json"), images=[str(tmp_path / "downloaded")], embed_captions=True,
          caption_key="json:caption", **OPTIONS)
    assert _metadata(tmp_path / "json")["caption"] == [f"json {i}" for i in range(3)]


def test_compressed_shards_and_dotted_keys(tmp_path):
    samples = [(f"img.v1.{i:03d}", {"jpg": image_bytes(i), "txt": f"t{i}".encode()})
               for i in range(3)]
    write_tar_shard(tmp_path / "plain.tar", samples)
    with open(tmp_path / "plain.tar", "rb") as f:
        (tmp_path / "packed.tar.gz").write_bytes(gzip.compress(f.read()))
    rows = {}
    for name in ("plain.tar", "packed.tar.gz"):
        summary = embed(str(tmp_path / name.split(".")[0]), images=[str(tmp_path / name)],
                        embed_captions=True, **OPTIONS)
        assert summary["rows"] == 3 and summary["failures"] == 0, summary
        rows[name] = {key.rpartition(":")[2]: row
                      for key, row in read_output(tmp_path / name.split(".")[0]).items()}
        metadata = _metadata(tmp_path / name.split(".")[0])
        assert metadata["image_path"] == [f"img.v1.{i:03d}" for i in range(3)]
        assert metadata["caption"] == [f"t{i}" for i in range(3)]
    assert_rows_equal(rows["packed.tar.gz"], rows["plain.tar"], 0.0)


def test_a_struct_cell_path_is_read_relative_to_the_table(tmp_path):
    folder, data = _images(tmp_path, 2)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "images/1.img"},
                                                {"bytes": None, "path": "images/nope.img"}])}),
                   buffer)
    (tmp_path / "t.parquet").write_bytes(buffer.getvalue())
    summary = embed(str(tmp_path / "out"), images=[str(tmp_path / "t.parquet")],
                    image_column="image", **OPTIONS)
    assert summary["rows"] == 1 and summary["failures"] == 1
    assert "unreadable" in next(iter(read_failures(tmp_path / "out").values()))


def test_tar_jobs_show_shards_done_of_total_and_an_eta(tmp_path, monkeypatch):
    from fastclip.embed import runner
    clock = iter([100.0, 130.0])  # the start, then the first shard done 30 s later
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    progress = runner.ShardProgress(shards=4, items_known=False)
    assert progress.postfix({"last": False}, 0) == {"shards": "0/4", "failures": 0}
    assert progress.postfix({"last": True}, 2) == {"shards": "1/4", "failures": 2,
                                                   "eta": "00:01:30"}
    monkeypatch.undo()
    for n in range(2):
        write_tar_shard(tmp_path / f"{n}.tar", [(f"{n}{i}", {"jpg": image_bytes(i)})
                                                for i in range(2)])
    from embed_helpers import run_fastclip
    result = run_fastclip("embed", "--images", tmp_path / "{0..1}.tar", "-o", tmp_path / "out",
                          "--model", tiny_checkpoint())
    assert "shards=2/2" in result.stderr, result.stderr
