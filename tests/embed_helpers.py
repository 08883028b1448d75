"""Data and models that the embedding tests make for themselves: a tiny random CLIP saved as a
state dict, generated images, corrupt files, WebDataset tar shards and tables."""

import atexit
import functools
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

import numpy as np
import torch
from PIL import Image

from fastclip.loading import TINY_CONFIG

from small_models import small_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache()
def tiny_checkpoint():
    """The path of a small random ViT CLIP's state dict (64-pixel images, 64-d embeddings),
    saved once per test process."""
    model = small_clip(seed=1, **TINY_CONFIG)
    folder = tempfile.mkdtemp(prefix="fastclip_tiny_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "tiny.pt")
    torch.save(model.state_dict(), path)
    return path


def image_bytes(seed, size=(48, 40), format="JPEG", mode="RGB"):
    """An encoded random image; sizes vary so that resizing and cropping are exercised."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_images(folder, count, start=0, nested=True):
    """``count`` images (JPEG, PNG, grayscale, RGBA, varied sizes) under ``folder``; returns
    their paths in the order ``fastclip embed`` lists a folder."""
    paths = []
    for i in range(start, start + count):
        kind = i % 3
        subfolder = os.path.join(folder, f"part{i % 2}") if nested else folder
        os.makedirs(subfolder, exist_ok=True)
        format, extension, mode = [("JPEG", "jpg", "RGB"), ("PNG", "png", "RGBA"),
                                   ("PNG", "png", "L")][kind]
        path = os.path.join(subfolder, f"img{i:04d}.{extension}")
        with open(path, "wb") as f:
            f.write(image_bytes(i, size=(40 + i % 7 * 5, 36 + i % 5 * 6), format=format,
                                mode=mode))
        paths.append(path)
    return sorted(paths)


def png_header_only(width, height):
    """The start of a PNG that claims ``width`` x ``height`` pixels: a decompression bomb's
    header, a few bytes long."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def corrupt_inputs():
    """``{name: (bytes, reason substring)}``: the bad inputs every source must survive."""
    good = image_bytes(99, size=(64, 64))
    return {
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"hello, I am not an image\n" * 4, "not an image"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "bomb.png": (png_header_only(40_000, 40_000), "decompression bomb"),
    }


def write_corrupt_files(folder):
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, (data, reason) in corrupt_inputs().items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        paths[path] = reason
    return paths


def write_tar_shard(path, samples):
    """A WebDataset shard: ``samples`` is a list of ``(key, {extension: bytes})``."""
    with tarfile.open(path, "w") as archive:
        for key, fields in samples:
            for extension, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def run_fastclip(*args, env=None, check=True, launcher=None):
    """Run ``python -m fastclip ARGS`` (or under ``launcher``, e.g. torchrun's arguments) in
    a fresh process; returns the CompletedProcess."""
    command = [sys.executable, "-m"] + (launcher or []) + ["fastclip", *map(str, args)]
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            cwd=REPO, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def read_output(folder, kind="img_emb"):
    """``{key: embedding row}`` of an output folder, read back with numpy and pyarrow, after
    checking that every shard's embeddings and metadata have the same number of rows."""
    import glob

    import pyarrow.parquet as pq
    rows = {}
    for metadata_path in sorted(glob.glob(os.path.join(folder, "metadata", "*.parquet"))):
        number = os.path.basename(metadata_path)[len("metadata_"):-len(".parquet")]
        embeddings = np.load(os.path.join(folder, kind, f"{kind}_{number}.npy"))
        keys = pq.read_table(metadata_path).column("key").to_pylist()
        assert len(keys) == len(embeddings), (
            f"shard {number}: {len(keys)} metadata rows but {len(embeddings)} embeddings")
        for key, row in zip(keys, embeddings):
            assert key not in rows, f"{key} appears in more than one row"
            rows[key] = row
    return rows


def assert_rows_equal(actual, expected, atol, name="rows"):
    """Two ``{key: row}`` maps have the same keys and rows within ``atol``; a failure names
    the worst key and element."""
    assert set(actual) == set(expected), (
        f"{name}: missing {sorted(set(expected) - set(actual))[:5]}, "
        f"unexpected {sorted(set(actual) - set(expected))[:5]}")
    not_finite = [key for key in actual if not np.isfinite(actual[key]).all()]
    assert not not_finite, f"{name}: rows with NaN or infinity: {not_finite[:5]}"
    worst = max(((key, int(np.abs(actual[key].astype(np.float64) - expected[key]).argmax()))
                 for key in expected),
                key=lambda place: abs(float(actual[place[0]][place[1]])
                                      - float(expected[place[0]][place[1]])))
    key, index = worst
    error = abs(float(actual[key][index]) - float(expected[key][index]))
    assert error <= atol, (f"{name}: worst element {key}[{index}]: {actual[key][index]} vs "
                           f"{expected[key][index]} (error {error:.3e} > {atol:.1e})")


def read_failures(folder):
    """``{key: reason}`` of an output folder's failures.jsonl."""
    with open(os.path.join(folder, "failures.jsonl")) as f:
        return {record["key"]: record["reason"] for record in map(json.loads, f)}


def run_python(tmp_path, source, *args):
    """Run ``source`` as a script file in a fresh Python (TorchScript needs its source in a
    file); returns the CompletedProcess."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=300)
