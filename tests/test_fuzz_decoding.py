"""Fuzzing one input's decoding: random mutations of valid JPEG, PNG, WebP and tar bytes
must each end as a row or a recorded failure, never an exception that would stop a job, and
never a hang. Bounded in time, so it runs in CI; the seed of every case is in its message."""

import io
import random
import tarfile
import time

import pytest
import torch

from fastclip.embed.plan import Chunk
from fastclip.embed.reader import EmbedDataset
from fastclip.transform import Preprocess

from embed_helpers import image_bytes

SECONDS_PER_FORMAT = 8
SLOWEST_CASE_SECONDS = 5


def mutate(data, rng):
    """One of the ways bytes go bad: flipped bytes, a cut, inserted or repeated runs."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(data)) if data else 0
        if kind == 0:  # flip a few bytes
            for i in rng.sample(range(len(data)), min(len(data), rng.randint(1, 8))):
                data[i] = rng.randrange(256)
        elif kind == 1:  # cut short
            data = data[:at]
        elif kind == 2:  # insert random bytes
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind == 3:  # repeat a run
            run = data[at:at + rng.randint(1, 256)]
            data[at:at] = run * rng.randint(1, 4)
        else:  # overwrite with a large number (sizes and lengths in headers)
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                          b"\x00\x00\x00\x00", b"99999999"])
    return bytes(data)


def dataset():
    return EmbedDataset([], Preprocess(32), batch_size=4, embed_images=True,
                        embed_texts=False, max_pixels=1_000_000, max_bytes=1 << 20)


def check(outcome, case):
    row, image, reason = outcome
    if reason is None:
        assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32), case
        assert torch.isfinite(image).all(), case
    else:
        assert isinstance(reason, str) and image is None, case


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP"])
def test_mutated_images_end_as_a_row_or_a_failure(format):
    data = dataset()
    seed_bytes = image_bytes(0, size=(40, 30), format=format)
    deadline = time.monotonic() + SECONDS_PER_FORMAT
    case = 0
    while time.monotonic() < deadline:
        rng = random.Random(f"{format}-{case}")
        mutated = mutate(seed_bytes, rng)
        start = time.monotonic()
        check(data._sample(f"case {case}", None, None, lambda: mutated),
              f"{format} case {case}")
        assert time.monotonic() - start < SLOWEST_CASE_SECONDS, f"{format} case {case}"
        case += 1
    assert case > 50  # the bound in time still tried many inputs


def shard_bytes():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i in range(3):
            for extension, payload in (("jpg", image_bytes(i, size=(20, 16))),
                                       ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:03d}.{extension}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("compress", [False, True])
def test_mutated_tar_shards_end_as_rows_or_failures(tmp_path, compress):
    import gzip

    data = dataset()
    seed_bytes = shard_bytes()
    path = tmp_path / "shard.tar"
    deadline = time.monotonic() + SECONDS_PER_FORMAT
    case = 0
    while time.monotonic() < deadline:
        rng = random.Random(f"tar-{compress}-{case}")
        mutated = mutate(seed_bytes, rng)
        path.write_bytes(gzip.compress(mutated) if compress else mutated)
        start = time.monotonic()
        for outcome in data._samples(Chunk(index=0, tar_path=str(path))):
            check(outcome, f"tar case {case}")
        assert time.monotonic() - start < SLOWEST_CASE_SECONDS, f"tar case {case}"
        case += 1
    assert case > 50
