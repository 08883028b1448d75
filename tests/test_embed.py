"""End-to-end tests of fastclip embed on generated data: every source kind, corrupt inputs,
rows equal to the model's own encode_image / encode_text, resume, and the output read back
with numpy and pyarrow."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import fastclip
from fastclip.embed import embed
from fastclip.embed.output import OutputFolder

from embed_helpers import (
    assert_rows_equal,
    image_bytes,
    read_failures,
    read_output,
    tiny_checkpoint,
    write_corrupt_files,
    write_images,
    write_tar_shard,
)

# Embeddings are unit vectors with entries around 0.1; fp32 rows of a batch differ from
# rows computed one image at a time by ~1e-7, fp16 storage rounds at ~5e-4 relative.
FP32_ATOL = 2e-5
FP16_ATOL = 2e-4


@pytest.fixture(scope="module")
def model():
    return fastclip.load(tiny_checkpoint(), device="cpu")


def image_rows(model, paths, keys=None, normalize=True):
    """The contract of fastclip embed: ``model.encode_image(preprocess(image))``, one image at a
    time, normalized when asked."""
    clip_model, preprocess = model
    rows = {}
    with torch.inference_mode():
        for key, path in zip(keys or paths, paths):
            features = clip_model.encode_image(preprocess(Image.open(path))[None])[0].float()
            rows[key] = (features / features.norm() if normalize else features).numpy()
    return rows


def text_rows(model, texts_by_key):
    clip_model, _ = model
    with torch.inference_mode():
        tokens = fastclip.tokenize(list(texts_by_key.values()), truncate=True)
        features = clip_model.encode_text(tokens).float()
        features = features / features.norm(dim=-1, keepdim=True)
    return dict(zip(texts_by_key, features.numpy()))


def run(output, checkpoint, **options):
    options = {"batch_size": 2, "num_workers": 0, "shard_size": 3, "dtype": "fp32",
               "progress": False, **options}
    return embed(str(output), model=checkpoint, **options)


def test_folder_rows_equal_encode_image_and_failures_are_recorded(tmp_path, model):
    paths = write_images(tmp_path / "images", 7)
    corrupt = write_corrupt_files(tmp_path / "images" / "bad")
    summary = run(tmp_path / "out", tiny_checkpoint(), images=[str(tmp_path / "images")])

    out = tmp_path / "out"
    assert_rows_equal(read_output(out), image_rows(model, paths), FP32_ATOL)
    failures = read_failures(out)
    assert set(failures) == set(corrupt)
    for path, reason in corrupt.items():
        assert reason in failures[path], f"{path}: {failures[path]!r} lacks {reason!r}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"inputs": 11, "rows": 7, "images": 7, "texts": 0,
                                  "failures": 4, "shards": manifest["counts"]["shards"]}
    assert (manifest["normalized"], manifest["dtype"], manifest["failures"]) == (True, "fp32", 4)
    assert manifest["model"] == tiny_checkpoint() and manifest["backend"] == "torch"
    assert manifest["fastclip_version"] == fastclip.__version__
    assert summary["manifest"] == manifest and summary["inputs"] == 11
    # Shard 0 holds only the corrupt files ("bad" sorts first): no rows, so no files.
    assert not (out / "metadata" / "metadata_0.parquet").exists()
    metadata = pq.read_table(out / "metadata" / "metadata_1.parquet")
    assert metadata.column_names == ["key", "image_path", "caption"]
    assert not (out / "text_emb").exists()
    assert not [name for _, _, names in os.walk(out) for name in names if ".tmp-" in name]


def test_fp16_storage_and_unnormalized_rows(tmp_path, model):
    paths = write_images(tmp_path / "images", 3)
    run(tmp_path / "fp16", tiny_checkpoint(), images=[str(tmp_path / "images")], dtype="fp16")
    stored = read_output(tmp_path / "fp16")
    assert {row.dtype for row in stored.values()} == {np.dtype(np.float16)}
    assert_rows_equal(stored, image_rows(model, paths), FP16_ATOL, "fp16 rows")

    run(tmp_path / "raw", tiny_checkpoint(), images=[str(tmp_path / "images")], normalize=False)
    assert_rows_equal(read_output(tmp_path / "raw"), image_rows(model, paths, normalize=False),
                      FP32_ATOL, "unnormalized rows")
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["normalized"] is False


def test_worker_processes_give_the_same_rows_as_the_main_process(tmp_path, model):
    paths = write_images(tmp_path / "images", 8, nested=False)
    listing = tmp_path / "images" / "list.txt"
    listing.write_text("\n".join(os.path.basename(p) for p in paths) + "\n")
    run(tmp_path / "out", tiny_checkpoint(), images=[str(listing)], num_workers=2, shard_size=2)
    assert_rows_equal(read_output(tmp_path / "out"), image_rows(model, paths), FP32_ATOL)


def test_one_shard_is_decoded_by_every_worker_in_input_order(tmp_path, model, monkeypatch):
    """A job of one shard still uses several decoding workers (pieces of batch_size inputs);
    the shard's rows come out in input order, corrupt files between them, and an input count
    that is a multiple of the batch size leaves no empty piece behind."""
    from fastclip.embed import runner

    good = write_images(tmp_path / "images", 8, nested=False)
    corrupt = list(write_corrupt_files(tmp_path / "images" / "z_bad"))
    listing = tmp_path / "list.txt"
    order = [good[0], corrupt[0], *good[1:5], corrupt[1], *good[5:], *corrupt[2:]]
    listing.write_text("\n".join(order) + "\n")
    used = []
    loader = runner.DataLoader

    def recording_loader(dataset, **options):
        used.append((len(dataset.units()), options["num_workers"]))
        return loader(dataset, **options)

    monkeypatch.setattr(runner, "DataLoader", recording_loader)
    run(tmp_path / "out", tiny_checkpoint(), images=[str(listing)], num_workers=3,
        shard_size=100, batch_size=3)
    assert used == [(4, 3)]  # 12 inputs in pieces of 3, on 3 workers
    out = tmp_path / "out"
    keys = pq.read_table(out / "metadata" / "metadata_0.parquet").column("key").to_pylist()
    assert keys == good
    assert_rows_equal(read_output(out), image_rows(model, good), FP32_ATOL)
    assert set(read_failures(out)) == set(corrupt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 12 and manifest["counts"]["rows"] == 8


def test_writer_puts_pieces_back_in_order(tmp_path):
    """Pieces of a chunk may arrive in any order (the last one first); the shard is written
    once all are in, in piece order."""
    from fastclip.embed.writer import ShardWriter

    folder = OutputFolder(str(tmp_path / "out"), 1)
    folder.make_folders(True, False)
    writer = ShardWriter(folder, ("key",))
    pieces = {i: torch.arange(2 * i, 2 * i + 2, dtype=torch.float32)[:, None].repeat(1, 4)
              for i in range(3)}
    for piece in (2, 0, 1):
        writer.submit({"chunk": 0, "piece": piece, "last": piece == 2, "inputs": 2,
                       "rows": [{"key": f"k{2 * piece}"}, {"key": f"k{2 * piece + 1}"}],
                       "failures": [], "image": (pieces[piece], None), "text": None})
        if piece != 1:
            assert not folder.done_indices()  # not complete yet
    writer.close()
    assert folder.done_indices() == {0}
    embeddings = np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy")
    assert embeddings[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    keys = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").column("key")
    assert keys.to_pylist() == [f"k{i}" for i in range(6)]


def test_tar_shards_with_captions_and_a_truncated_shard(tmp_path, model):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected_images, expected_texts = {}, {}
    for shard in range(2):
        samples = []
        for i in range(3):
            key = f"s{shard}/{i:04d}"
            data = image_bytes(10 * shard + i, size=(50 + i, 45))
            samples.append((key, {"jpg": data, "txt": f"caption {shard} {i}".encode()}))
            full_key = f"{shards}/{shard:05d}.tar:{key}"
            image_path = tmp_path / f"{shard}_{i}.jpg"
            image_path.write_bytes(data)
            expected_images[full_key] = image_path
            expected_texts[full_key] = f"caption {shard} {i}"
        samples.append((f"s{shard}/nojpg", {"txt": b"caption without image"}))
        samples.append((f"s{shard}/bad", {"jpg": b"garbage", "txt": b"bad image"}))
        write_tar_shard(shards / f"{shard:05d}.tar", samples)
    # A third shard cut inside its second image: its first sample survives.
    write_tar_shard(shards / "00002.tar", [("t/0", {"jpg": image_bytes(7), "txt": b"kept"}),
                                           ("t/1", {"jpg": image_bytes(8), "txt": b"lost"})])
    data = (shards / "00002.tar").read_bytes()
    (shards / "00002.tar").write_bytes(data[:data.index(image_bytes(8)) + 50])
    (tmp_path / "kept.jpg").write_bytes(image_bytes(7))
    expected_images[f"{shards}/00002.tar:t/0"] = tmp_path / "kept.jpg"
    expected_texts[f"{shards}/00002.tar:t/0"] = "kept"

    run(tmp_path / "out", tiny_checkpoint(), images=[str(shards / "{00000..00002}.tar")],
        embed_captions=True, num_workers=2)
    out = tmp_path / "out"
    keys = list(expected_images)
    assert_rows_equal(read_output(out), image_rows(model, [str(expected_images[k]) for k in keys],
                                                   keys), FP32_ATOL, "image rows")
    assert_rows_equal(read_output(out, "text_emb"), text_rows(model, expected_texts),
                      FP32_ATOL, "caption rows")
    failures = read_failures(out)
    assert sorted(failures) == sorted([f"{shards}/0000{s}.tar:s{s}/{k}" for s in (0, 1)
                                       for k in ("nojpg", "bad")] + [f"{shards}/00002.tar"])
    assert "cut short" in failures[f"{shards}/00002.tar"]
    metadata = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert metadata.column("caption").to_pylist() == ["caption 0 0", "caption 0 1",
                                                      "caption 0 2"]
    # A shard sample's image_path is its key, as clip-retrieval writes it (never null).
    assert metadata.column("image_path").to_pylist() == ["s0/0000", "s0/0001", "s0/0002"]


def test_parquet_and_csv_tables(tmp_path, model):
    paths = write_images(tmp_path / "images", 4, nested=False)
    pq.write_table(pa.table({"url": [os.path.relpath(p, tmp_path) for p in paths[:2]]}),
                   tmp_path / "a.parquet")
    pacsv.write_csv(pa.table({"url": [os.path.relpath(p, tmp_path) for p in paths[2:]]
                              + ["images/missing.jpg"]}), tmp_path / "b.csv")
    run(tmp_path / "out", tiny_checkpoint(), images=[str(tmp_path / "a.parquet"),
                                                   str(tmp_path / "b.csv")],
        image_column="url")
    keys = [f"{tmp_path}/a.parquet:0", f"{tmp_path}/a.parquet:1", f"{tmp_path}/b.csv:0",
            f"{tmp_path}/b.csv:1"]
    assert_rows_equal(read_output(tmp_path / "out"), image_rows(model, paths, keys), FP32_ATOL)
    assert "FileNotFoundError" in read_failures(tmp_path / "out")[f"{tmp_path}/b.csv:2"]


def test_texts_alone_and_paired_with_images(tmp_path, model):
    lines = ["a photo of a cat", "", "a diagram " * 40, "ünïcödé text"]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pacsv.write_csv(pa.table({"caption": ["from csv"]}), tmp_path / "t.csv")
    run(tmp_path / "texts", tiny_checkpoint(), texts=[str(tmp_path / "texts.txt"),
                                                    str(tmp_path / "t.csv")])
    expected = {f"{tmp_path}/texts.txt:{n}": text for n, text in enumerate(lines, start=1)}
    expected[f"{tmp_path}/t.csv:0"] = "from csv"
    assert_rows_equal(read_output(tmp_path / "texts", "text_emb"), text_rows(model, expected),
                      FP32_ATOL)
    assert not (tmp_path / "texts" / "img_emb").exists()

    paths = write_images(tmp_path / "images", 4)
    run(tmp_path / "pairs", tiny_checkpoint(), images=[str(tmp_path / "images")],
        texts=[str(tmp_path / "texts.txt")])
    pairs = dict(zip(paths, lines))
    assert_rows_equal(read_output(tmp_path / "pairs"), image_rows(model, paths), FP32_ATOL)
    assert_rows_equal(read_output(tmp_path / "pairs", "text_emb"), text_rows(model, pairs),
                      FP32_ATOL)


def test_limit_takes_the_first_inputs(tmp_path):
    paths = write_images(tmp_path / "images", 5)
    run(tmp_path / "out", tiny_checkpoint(), images=[str(tmp_path / "images")], limit=2)
    assert sorted(read_output(tmp_path / "out")) == paths[:2]


class Crash(Exception):
    pass


def test_resume_after_a_crash_completes_every_input_exactly_once(tmp_path, monkeypatch):
    write_images(tmp_path / "images", 10)
    write_corrupt_files(tmp_path / "images" / "bad")
    images = [str(tmp_path / "images")]
    run(tmp_path / "whole", tiny_checkpoint(), images=images, shard_size=2)

    commit = OutputFolder.commit_chunk
    commits = []

    def commit_then_crash(self, index, *args):
        if len(commits) == 3:
            # Die between the embeddings and the done marker of this chunk, as a kill can.
            np.save(self.path("img_emb", index), np.zeros((1, 64), np.float32))
            open(self.path("img_emb", index) + ".tmp-12345", "wb").close()
            raise Crash()
        commits.append(index)
        return commit(self, index, *args)

    monkeypatch.setattr(OutputFolder, "commit_chunk", commit_then_crash)
    with pytest.raises(RuntimeError, match="Writing to .* failed"):
        run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=2)
    monkeypatch.setattr(OutputFolder, "commit_chunk", commit)
    assert not (tmp_path / "out" / "manifest.json").exists()

    with pytest.raises(FileExistsError, match="pass --resume"):
        run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=2)
    with pytest.raises(ValueError, match="inputs or --shard-size differ"):
        run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=3, resume=True)
    with pytest.raises(ValueError, match="dtype='fp32', not 'fp16'"):
        run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=2, resume=True,
            dtype="fp16")

    summary = run(tmp_path / "out", tiny_checkpoint(), images=images, shard_size=2, resume=True)
    assert summary["inputs"] == 14 - 2 * len(commits)  # only the missing chunks are redone
    assert_rows_equal(read_output(tmp_path / "out"), read_output(tmp_path / "whole"), 0.0)
    assert read_failures(tmp_path / "out") == read_failures(tmp_path / "whole")
    with open(tmp_path / "out" / "failures.jsonl") as f:
        assert len(f.readlines()) == 4
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"] == \
        json.loads((tmp_path / "whole" / "manifest.json").read_text())["counts"]
    assert not [n for _, _, names in os.walk(tmp_path / "out") for n in names if ".tmp-" in n]


def test_output_folder_with_other_files_is_refused(tmp_path):
    write_images(tmp_path / "images", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no fastclip job"):
        run(tmp_path / "out", tiny_checkpoint(), images=[str(tmp_path / "images")])


def test_bad_options_are_explained_before_any_work(tmp_path):
    write_images(tmp_path / "images", 1)
    for options, message in [({"limit": 0}, "limit must be at least 1"),
                             ({"num_workers": -1}, "num_workers must be 0"),
                             ({"batch_size": 0}, "batch_size must be at least 1"),
                             ({"dtype": "bf16"}, r"dtype must be one of \['fp16', 'fp32'\]")]:
        with pytest.raises(ValueError, match=message):
            embed(str(tmp_path / "out"), images=str(tmp_path / "images"), model="random:tiny",
                  **options)
    assert not (tmp_path / "out").exists()


def test_ranks_without_a_process_group_and_a_resume_with_another_world_size(
        tmp_path, monkeypatch):
    """A launcher that sets RANK and WORLD_SIZE but no MASTER_ADDR: ranks run one after
    the other here; the last to finish writes the manifest."""
    write_images(tmp_path / "images", 9)
    images = [str(tmp_path / "images")]
    run(tmp_path / "one", tiny_checkpoint(), images=images, shard_size=2)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        summary = run(tmp_path / "two", tiny_checkpoint(), images=images, shard_size=2)
        assert (summary["manifest"] is None) == (rank == "0")
    assert_rows_equal(read_output(tmp_path / "two"), read_output(tmp_path / "one"), 0.0)

    # Three ranks start a job and rank 1 dies before its first shard; one process resumes.
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in ("0", "2"):
        monkeypatch.setenv("RANK", rank)
        run(tmp_path / "three", tiny_checkpoint(), images=images, shard_size=2)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    summary = run(tmp_path / "three", tiny_checkpoint(), images=images, shard_size=2,
                  resume=True)
    assert summary["inputs"] == 3  # rank 1's shards: 1 (2 images) and 4 (1 image)
    assert summary["manifest"]["counts"]["rows"] == 9
    assert_rows_equal(read_output(tmp_path / "three"), read_output(tmp_path / "one"), 0.0)
