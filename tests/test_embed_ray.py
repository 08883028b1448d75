"""The Ray Data callable: called directly (always) and through a local Ray instance (when
Ray is installed)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import fastclip
from fastclip.embed.ray import ClipEmbedder

from embed_helpers import assert_rows_equal, image_bytes, tiny_checkpoint
from servers import needed


def expected_image_rows(checkpoint, encoded):
    model, preprocess = fastclip.load(checkpoint, device="cpu")
    with torch.inference_mode():
        images = torch.stack([preprocess(Image.open(io.BytesIO(b)))
                              for b in encoded])
        features = model.encode_image(images).float()
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


def test_image_batch_of_bytes_paths_and_arrays(tmp_path):
    encoded = [image_bytes(i, format="PNG") for i in range(3)]
    (tmp_path / "one.png").write_bytes(encoded[1])
    column = np.array([encoded[0], str(tmp_path / "one.png"), b"corrupt",
                       np.asarray(Image.open(io.BytesIO(encoded[2])))],
                      dtype=object)
    embedder = ClipEmbedder(tiny_checkpoint(), image_column="image", device="cpu")
    batch = embedder({"image": column, "id": np.arange(4)})
    assert list(batch["id"]) == [0, 1, 2, 3]
    assert batch["error"][2].startswith("not an image") and not any(batch["error"][[0, 1, 3]])
    assert np.isnan(batch["embedding"][2]).all()
    expected = expected_image_rows(tiny_checkpoint(), encoded)
    actual = batch["embedding"][[0, 1, 3]]
    assert_rows_equal(dict(enumerate(actual)), dict(enumerate(expected)), 2e-5)


def test_text_batch():
    texts = np.array(["a cat", "a dog on a skateboard"], dtype=object)
    batch = ClipEmbedder(tiny_checkpoint(), text_column="caption", dtype="fp16",
                         device="cpu")({"caption": texts})
    model, _ = fastclip.load(tiny_checkpoint(), device="cpu")
    with torch.inference_mode():
        features = model.encode_text(fastclip.tokenize(list(texts))).float()
    expected = (features / features.norm(dim=-1, keepdim=True)).numpy()
    assert batch["embedding"].dtype == np.float16
    assert_rows_equal(dict(enumerate(batch["embedding"])), dict(enumerate(expected)), 2e-4)


def test_wrong_column_and_arguments_are_explained():
    with pytest.raises(ValueError, match="give image_column or text_column"):
        ClipEmbedder(tiny_checkpoint(), device="cpu")
    embedder = ClipEmbedder(tiny_checkpoint(), image_column="jpg", device="cpu")
    with pytest.raises(KeyError, match=r"no column 'jpg'.*\['image'\]"):
        embedder({"image": np.array([b""], dtype=object)})


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of two CPUs for this module's tests."""
    ray = needed("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_map_batches_on_a_local_ray_instance(local_ray):
    ray = local_ray
    texts = [f"caption number {i}" for i in range(10)]
    dataset = ray.data.from_items([{"caption": t} for t in texts])
    rows = dataset.map_batches(
        ClipEmbedder, fn_constructor_kwargs=dict(model=tiny_checkpoint(),
                                                 text_column="caption", device="cpu"),
        batch_format="numpy", batch_size=4,
        compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    direct = ClipEmbedder(tiny_checkpoint(), text_column="caption", device="cpu")(
        {"caption": np.array(texts, dtype=object)})["embedding"]
    got = {row["caption"]: np.asarray(row["embedding"]) for row in rows}
    assert_rows_equal(got, dict(zip(texts, direct)), 1e-5)


@pytest.mark.parametrize("cells", ["bytes", "struct"])
def test_map_batches_embeds_a_parquet_of_image_bytes_read_by_ray(local_ray, tmp_path, cells):
    import pyarrow as pa
    import pyarrow.parquet as pq
    ray = local_ray
    encoded = [image_bytes(i, format="PNG") for i in range(5)]
    column = (pa.array(encoded, pa.binary()) if cells == "bytes"
              else pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)]))
    pq.write_table(pa.table({"image": column, "id": list(range(5))}), tmp_path / "t.parquet")
    rows = ray.data.read_parquet(str(tmp_path / "t.parquet")).map_batches(
        ClipEmbedder, fn_constructor_kwargs=dict(model=tiny_checkpoint(), image_column="image",
                                                 device="cpu"),
        batch_format="numpy", batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    assert all(row["error"] == "" for row in rows), [row["error"] for row in rows]
    got = {int(row["id"]): np.asarray(row["embedding"]) for row in rows}
    expected = expected_image_rows(tiny_checkpoint(), encoded)
    assert_rows_equal(got, dict(enumerate(expected)), 2e-5)


def test_the_whole_job_as_ray_tasks_reads_and_writes_s3(local_ray, s3, tmp_path):
    """Two Ray tasks, two ranks of one job: shards from the S3 server, clip-retrieval's
    layout written back there, the rows those of one local process."""
    from fastclip.embed import embed
    from fastclip.embed.job import EmbedJob
    from fastclip.embed.ray import run_on_ray

    from embed_helpers import read_output, write_tar_shard
    fs, bucket = s3
    for n in range(3):
        samples = [(f"{n}-{i}", {"jpg": image_bytes(10 * n + i)}) for i in range(3)]
        write_tar_shard(tmp_path / f"{n}.tar", samples)
        fs.put(str(tmp_path / f"{n}.tar"), f"{bucket}/shards/{n}.tar")
    storage = {"s3": {"endpoint_url": fs.client_kwargs.get("endpoint_url") or
                      fs.endpoint_url, "key": "testing", "secret": "testing"}}
    job = EmbedJob(output=f"s3://{bucket}/out", images=(f"s3://{bucket}/shards/{{0..2}}.tar",),
                   model=tiny_checkpoint(), num_workers=0, progress=False, dtype="fp32",
                   storage_options=storage)
    summaries = run_on_ray(job, tasks=2)
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert sum(s["rows"] for s in summaries) == 9
    fs.invalidate_cache()
    fs.get(f"{bucket}/out/", str(tmp_path / "downloaded"), recursive=True)
    embed(str(tmp_path / "whole"), images=[str(tmp_path / "{0..2}.tar")], model=tiny_checkpoint(),
          num_workers=0, progress=False, dtype="fp32")
    by_sample = lambda rows: {k.rpartition(":")[2]: v for k, v in rows.items()}  # noqa: E731
    assert_rows_equal(by_sample(read_output(tmp_path / "downloaded")),
                      by_sample(read_output(tmp_path / "whole")), 0.0)
    assert (tmp_path / "downloaded" / "manifest.json").exists()
