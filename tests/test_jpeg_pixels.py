"""JPEGs decoded straight to pixels (simplejpeg, libjpeg-turbo): the same pixels as PIL's
decode converted to RGB on generated JPEGs of every subsampling, progressive, restart
markers, grayscale and odd sizes; everything else (CMYK, damaged streams, other formats,
bombs, a decoder that disagrees) left to PIL's path; and the embed reader's batches equal to
OpenAI's transform on the images it decodes this way."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import fastclip
from fastclip import images
from fastclip.embed.plan import plan_job
from fastclip.embed.reader import EmbedDataset
from fastclip.images import decode_image, decode_jpeg_pixels

from embed_helpers import tiny_checkpoint

pytest.importorskip("simplejpeg")


def _jpeg(rng, width, height, mode="RGB", **options):
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1),
                       (x + y) * 127 / max(width + height, 1)], -1)
    noise = rng.normal(0, rng.uniform(0, 60), (height, width, 3))
    image = Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, "JPEG", **options)
    except OSError:  # Pillow's encoder cannot write some progressive or restart streams
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=options.get("quality", 75),
                   subsampling=options.get("subsampling", -1))
    return buffer.getvalue()


def _generated(count, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = (int(rng.integers(1, 64)), int(rng.integers(1, 64))) if i % 3 == 0 \
            else (int(rng.integers(64, 1400)), int(rng.integers(64, 1000)))
        options = dict(quality=int(rng.integers(20, 101)),
                       subsampling=int(rng.integers(0, 3)),
                       progressive=bool(rng.integers(0, 2)))
        # (Pillow cannot write some progressive and optimized images: one or the other.)
        options["optimize"] = not options["progressive"] and bool(rng.integers(0, 2))
        if rng.integers(0, 4) == 0:
            options["restart_marker_blocks"] = int(rng.integers(1, 8))
        mode = "L" if i % 7 == 0 else "RGB"
        yield f"{i}: {width}x{height} {mode} {options}", _jpeg(rng, width, height, mode,
                                                                **options)


def test_the_pixels_are_pils_on_generated_jpegs():
    decoded = 0
    buffer = images.PixelBuffer(limit=1 << 20)  # used again by images up to 1 MiB
    for i, (name, data) in enumerate(_generated(240)):
        expected = np.asarray(decode_image(data).convert("RGB"))
        got = decode_jpeg_pixels(data, buffer=buffer if i % 2 else None)
        assert got is not None, name
        decoded += 1
        if not np.array_equal(got, expected):
            worst = np.unravel_index(np.abs(got.astype(int) - expected).argmax(), got.shape)
            raise AssertionError(f"{name}: pixel {worst} is {got[worst]}, PIL's "
                                 f"{expected[worst]}")
    assert decoded == 240


def test_what_is_not_certain_is_left_to_pil(monkeypatch):
    rng = np.random.default_rng(1)
    data = _jpeg(rng, 80, 60)
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 10), (10, 20, 30, 40)).save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert decode_jpeg_pixels(cmyk.getvalue()) is None
    assert decode_jpeg_pixels(png.getvalue()) is None
    assert decode_jpeg_pixels(data[:len(data) // 2]) is None  # truncated: PIL's failure
    with pytest.raises(images.InputError, match="truncated"):
        decode_image(data[:len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 8] = b"\xff\xd0" * 4  # stray restart markers
    assert decode_jpeg_pixels(bytes(damaged)) is None
    assert decode_jpeg_pixels(data, max_pixels=80 * 60 - 1) is None  # PIL's path refuses it
    # Headers that libjpeg only traces but PIL refuses stay PIL's failures: a JFIF segment
    # too short for its fields, a TEM marker.
    for segment in (b"\xff\xe0\x00\x06JFIF", b"\xff\x01"):
        odd = data[:2] + segment + data[2:]
        assert decode_jpeg_pixels(odd) is None
        with pytest.raises(images.InputError):
            decode_image(odd)
    monkeypatch.setitem(images._JPEG_CHECK, "agrees", False)  # a decoder that disagrees
    assert decode_jpeg_pixels(data) is None


def test_the_embed_reader_batches_are_openais_tensors(tmp_path):
    model, preprocess = fastclip.load(tiny_checkpoint(), device="cpu")
    assert preprocess.path == "compiled op"
    encoded = [data for _, data in _generated(12, seed=3)]
    for i, data in enumerate(encoded):
        (tmp_path / f"{i:02d}.jpg").write_bytes(data)
    plan = plan_job(images=[str(tmp_path)], shard_size=100)
    dataset = EmbedDataset(plan.chunks, preprocess, 5, True, False)
    rows = torch.cat([batch["images"] for batch in dataset])
    expected = torch.stack([preprocess.reference(decode_image(data)) for data in encoded])
    assert rows.shape == expected.shape and torch.equal(rows, expected)
