"""fastclip's preprocessing against a torchvision composition of OpenAI's transform."""

import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip import Preprocess

transforms = pytest.importorskip("torchvision.transforms")


def openai_transform(n_px):
    """OpenAI's ``clip._transform``, verbatim."""
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073),
                             (0.26862954, 0.26130258, 0.27577711)),
    ])


def random_image(mode, size, seed):
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        array = rng.integers(0, 65535, (height, width), dtype=np.uint16)
        return Image.frombytes("I;16", (width, height), array.tobytes())
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 37, (height, width), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 37 * 3, dtype=np.uint8).tobytes())
        return image
    if mode == "1":
        return random_image("L", size, seed).convert("1")
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"]
SIZES = [(1, 1), (7, 1000), (1000, 7), (224, 224), (225, 223), (333, 500), (4000, 3000)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bit_identical_to_openai_transform(mode, size):
    image = random_image(mode, size, seed=zlib.crc32(f"{mode}{size}".encode()))
    expected = openai_transform(224)(image)
    actual = Preprocess(224)(image)
    assert actual.dtype == torch.float32 and actual.shape == (3, 224, 224)
    assert actual.is_contiguous()
    assert torch.equal(actual, expected), (
        f"{mode} {size}: max difference {(actual - expected).abs().max().item()}")


@pytest.mark.parametrize("n_px", [64, 288, 336])
def test_other_resolutions(n_px):
    image = random_image("RGB", (640, 480), seed=n_px)
    assert torch.equal(Preprocess(n_px)(image), openai_transform(n_px)(image))


def test_rejects_non_images():
    with pytest.raises(TypeError, match="expects a PIL image"):
        Preprocess(224)(np.zeros((224, 224, 3), dtype=np.uint8))
