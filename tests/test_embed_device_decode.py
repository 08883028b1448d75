"""--gpu-decode: JPEGs decoded by torchvision on the model's device. On the CPU torchvision
decodes with libjpeg, so the routing, resizing and bookkeeping are tested here; the test
marked gpu runs the same job with nvjpeg."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.embed import device_decode, embed
from fastclip.transform import STD, Preprocess, normalize

from embed_helpers import (
    image_bytes,
    read_output,
    tiny_checkpoint,
    write_corrupt_files,
    write_images,
)

pytest.importorskip("torchvision")  # not a dependency of fastclip; --gpu-decode needs it
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

# Measured on generated photos and noise: the paths differ by at most a few grey levels
# (torch's antialiased bicubic against PIL's), which moves a tiny model's embeddings by a
# cosine of about 1e-4.
MIN_COSINE = 0.999


def cmyk_jpeg():
    buffer = io.BytesIO()
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_only_complete_rgb_or_gray_jpegs_go_to_the_device():
    jpeg = image_bytes(0, size=(40, 30))
    assert torch.equal(device_decode.device_decodable(jpeg, 10_000),
                       torch.tensor(list(jpeg), dtype=torch.uint8))
    assert device_decode.device_decodable(image_bytes(1, mode="L"), 10_000) is not None
    for name, data in [("png", image_bytes(0, format="PNG")),
                       ("truncated", jpeg[:len(jpeg) // 2]),
                       ("cmyk", cmyk_jpeg()), ("over the pixel limit", jpeg)]:
        limit = 100 if name == "over the pixel limit" else 10_000
        assert device_decode.device_decodable(data, limit) is None, name


@pytest.mark.parametrize("size", [(640, 480), (300, 200), (224, 224), (48, 40)])
def test_resize_crop_is_within_a_few_grey_levels_of_pil(size):
    data = image_bytes(3, size=size)
    decode_jpeg, rgb = device_decode.torchvision_decode_jpeg()
    pixels = device_decode.resize_crop(decode_jpeg(device_decode.device_decodable(data, 10**7),
                                                   mode=rgb), 64)
    expected = Preprocess(64)(Image.open(io.BytesIO(data)))
    actual = normalize(pixels)
    grey_levels = ((actual - expected).abs() * torch.tensor(STD)[:, None, None]
                   * 255)
    worst = np.unravel_index(int(grey_levels.argmax()), grey_levels.shape)
    # Upscaling (48x40 -> 64) differs most: the kernels differ most between pixels.
    limit = 12 if min(size) < 64 else 5
    assert grey_levels.max() <= limit, (f"{size}: {grey_levels.max():.1f} grey levels at "
                                        f"{tuple(worst)}")


def embed_both_ways(tmp_path, device):
    paths = write_images(tmp_path / "images", 9)
    corrupt = write_corrupt_files(tmp_path / "images" / "bad")
    (tmp_path / "images" / "cmyk.jpg").write_bytes(cmyk_jpeg())
    outputs = {}
    for gpu_decode in (False, True):
        output = tmp_path / f"out_{gpu_decode}"
        summary = embed(str(output), images=[str(tmp_path / "images")], model=tiny_checkpoint(),
                        batch_size=4, num_workers=1, shard_size=5, dtype="fp32",
                        device=device, gpu_decode=gpu_decode, progress=False)
        outputs[gpu_decode] = read_output(output), summary["manifest"]
    return paths, corrupt, outputs


def assert_paths_agree(paths, corrupt, outputs):
    (pil_rows, pil_manifest), (device_rows, device_manifest) = outputs[False], outputs[True]
    assert sorted(device_rows) == sorted(pil_rows) == sorted(paths + [
        p for p in pil_rows if p.endswith("cmyk.jpg")])
    assert device_manifest["counts"] == pil_manifest["counts"]
    assert device_manifest["failures"] == len(corrupt)
    assert device_manifest["gpu_decode"] is True and pil_manifest["gpu_decode"] is False
    cosines = {key: float(np.dot(device_rows[key], pil_rows[key])) for key in pil_rows}
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= MIN_COSINE, f"{os.path.basename(worst)}: cosine {cosines[worst]}"


def test_cpu_job_with_device_decoding_matches_the_pil_path(tmp_path, monkeypatch):
    decoded = []
    decode_on_device = device_decode.decode_on_device

    def counting(encoded, device):
        result = decode_on_device(encoded, device)
        decoded.extend(result)
        return result

    monkeypatch.setattr(device_decode, "decode_on_device", counting)
    assert_paths_agree(*embed_both_ways(tmp_path, "cpu"))
    assert len(decoded) == 3  # the three good RGB JPEGs among the nine images


def test_jpegs_the_device_cannot_decode_fall_back_to_pil(tmp_path, monkeypatch):
    monkeypatch.setattr(device_decode, "decode_on_device", lambda encoded, device: {})
    paths, corrupt, outputs = embed_both_ways(tmp_path, "cpu")
    assert_paths_agree(paths, corrupt, outputs)
    pil_rows, device_rows = outputs[False][0], outputs[True][0]
    assert all(np.array_equal(device_rows[k], pil_rows[k]) for k in pil_rows)


@pytest.mark.gpu
def test_nvjpeg_job_matches_the_pil_path(tmp_path):
    paths, corrupt, outputs = embed_both_ways(tmp_path, "cuda")
    assert_paths_agree(paths, corrupt, outputs)


@pytest.mark.parametrize("size", [(640, 480), (48, 40), (300, 900)])
def test_device_path_gives_the_pil_tensor_for_the_same_pixels(size):
    """With the compiled op, the --gpu-decode path resizes with Pillow's arithmetic: where the
    device decoder gives PIL's pixels (libjpeg on the CPU), the tensors are identical."""
    from fastclip.ops import preprocess as fused
    if not fused.available("cpu"):
        pytest.skip("fastclip._C is not built")
    data = image_bytes(5, size=size)
    preprocess = Preprocess(64)
    images, kept, failures = device_decode.device_images(
        [device_decode.device_decodable(data, 10**7)], preprocess, "cpu", 10**7)
    assert kept == [0] and not failures
    decode_jpeg, rgb = device_decode.torchvision_decode_jpeg()
    decoded = decode_jpeg(device_decode.device_decodable(data, 10**7), mode=rgb)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    if not torch.equal(decoded.permute(1, 2, 0), torch.from_numpy(np.asarray(pil))):
        pytest.skip("torchvision's libjpeg decodes these pixels otherwise than PIL's")
    assert torch.equal(images[0], preprocess(pil))
