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


def test_map_batches_on_a_local_ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    try:
        texts = [f"caption number {i}" for i in range(10)]
        dataset = ray.data.from_items([{"caption": t} for t in texts])
        rows = dataset.map_batches(
            ClipEmbedder, fn_constructor_kwargs=dict(model=tiny_checkpoint(),
                                                     text_column="caption", device="cpu"),
            batch_format="numpy", batch_size=4, concurrency=1).take_all()
    finally:
        ray.shutdown()
    direct = ClipEmbedder(tiny_checkpoint(), text_column="caption", device="cpu")(
        {"caption": np.array(texts, dtype=object)})["embedding"]
    got = {row["caption"]: np.asarray(row["embedding"]) for row in rows}
    assert_rows_equal(got, dict(zip(texts, direct)), 1e-5)
