"""Preprocessing throughput, per core: fastclip's compiled op against OpenAI's torchvision
transform and PIL's own resize, on decoded images and from JPEG bytes; and the embed job's
input-side ceiling (the tiny model, which costs almost nothing) with the op and without it.

    pytest benchmarks/bench_preprocess.py --benchmark-json=benchmarks/results/preprocess_cpu.json

Images are photo-like JPEGs (smooth content plus noise, quality 90) of 500x375, 1024x768 and
2048x1536, made once outside the timing. Every round checks that fastclip's tensors equal
OpenAI's (``torch.equal``). One thread: the numbers are per core. Rounds rotate the order of
the contenders (``timing.Rounds``); items/s and the ratios come from the medians.
"""

import io
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import fastclip
from fastclip.images import PixelBuffer, decode_image, decode_jpeg_pixels
from fastclip.ops import preprocess as fused

from timing import Rounds

SIZES = [(500, 375), (1024, 768), (2048, 1536)]
IMAGES = {"cpu": 24, "gpu": 24, "tiny": 3}
ROUNDS = {"cpu": 7, "gpu": 7, "tiny": 2}
# The embed job's rounds vary most (files, threads, the model): more of them.
EMBED_ROUNDS = {"cpu": 15, "gpu": 15, "tiny": 2}
MEAN, STD = fastclip.transform.MEAN, fastclip.transform.STD


def photo_jpegs(count, size, seed=0):
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    jpegs = []
    for i in range(count):
        channels = [np.sin(xx / (13.0 + i + c) + c) * 70 + np.cos(yy / (19.0 + c)) * 60 + 128
                    for c in range(3)]
        pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                        quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def openai_transform(n_px):
    transforms = pytest.importorskip("torchvision.transforms")
    return transforms.Compose([
        transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(n_px), lambda image: image.convert("RGB"),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(benchmark, rounds, task, size, count, baseline):
    benchmark.extra_info.update(task=task, image=f"{size[0]}x{size[1]}", batch=count,
                                model=f"{size[0]}x{size[1]} JPEG", dtype="fp32", threads=1,
                                preprocess_isa=torch.ops.fastclip.preprocess_isa())
    benchmark.extra_info.update(rounds.summary(count, baseline=baseline))


def race_openai(benchmark, sizes, inputs, to_image, third, task, size, ours_from=None):
    """Rounds of OpenAI's transform against ``fastclip.Preprocess`` on ``to_image(x)`` for
    each of ``inputs`` (or fastclip's own ``ours_from(preprocess, x)``), and a third
    contender ``third = (name, function)``; every round checks that the two give equal
    tensors."""
    if not fused.available("cpu"):
        pytest.skip("fastclip._C is not built")
    openai, ours = openai_transform(224), fastclip.Preprocess(224)
    ours_from = ours_from or (lambda preprocess, x: preprocess(to_image(x)))
    outputs = {}
    contenders = {
        "openai": lambda: outputs.__setitem__("openai", [openai(to_image(x)) for x in inputs]),
        "fastclip": lambda: outputs.__setitem__("fastclip",
                                                [ours_from(ours, x) for x in inputs]),
        third[0]: third[1],
    }
    rounds = Rounds(contenders)
    rounds.warm_up()

    def one_round():
        rounds.run_round()
        assert all(torch.equal(a, b) for a, b in zip(outputs["openai"], outputs["fastclip"]))

    benchmark.group = f"{task} {size[0]}x{size[1]}"
    benchmark.pedantic(one_round, rounds=ROUNDS[sizes], iterations=1)
    record(benchmark, rounds, f"{task}, 1 thread", size, len(inputs), "openai")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_decoded_images(benchmark, sizes, size, one_thread):
    """``preprocess`` on decoded PIL images: the op against OpenAI's transform and against
    PIL's bicubic resize alone (the part of OpenAI's transform that costs most)."""
    images = [decode_image(data) for data in photo_jpegs(IMAGES[sizes], size)]
    resized = fastclip.transform.resized_size(*size, 224)
    race_openai(benchmark, sizes, images, lambda image: image,
                ("PIL resize alone", lambda: [im.resize(resized, Image.BICUBIC) for im in images]),
                "preprocess of decoded images", size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_and_preprocess(benchmark, sizes, size, one_thread):
    """JPEG bytes to the model's input, as the embed job's workers do it: libjpeg-turbo's
    decode straight to pixels (simplejpeg, the same pixels as PIL's), then the op, against
    PIL's decode (libjpeg-turbo too) then OpenAI's transform; and PIL's decode alone."""
    jpegs = photo_jpegs(IMAGES[sizes], size, seed=1)
    assert all(decode_jpeg_pixels(data) is not None for data in jpegs)

    buffer = PixelBuffer()  # as each worker holds one

    def ours_from(preprocess, data):
        return preprocess.into_pixels(decode_jpeg_pixels(data, buffer=buffer),
                                      torch.empty(3, 224, 224))

    race_openai(benchmark, sizes, jpegs, decode_image,
                ("PIL decode alone", lambda: [decode_image(data) for data in jpegs]),
                "decode + preprocess", size, ours_from)


def test_embed_input_ceiling(benchmark, sizes, one_thread):
    """The embed job's reading side in one process, with the tiny model (which costs almost
    nothing) embedding each batch: 500x375 JPEGs from a folder, read as the job reads them
    (within its default read timeout), decoded, preprocessed into the batch and embedded, with
    the compiled op and with PIL's path (the job before it)."""
    if not fused.available("cpu"):
        pytest.skip("fastclip._C is not built")
    from fastclip.embed.job import DEFAULT_READ_TIMEOUT
    from fastclip.embed.plan import plan_job
    from fastclip.embed.reader import EmbedDataset
    count = {"cpu": 256, "gpu": 256, "tiny": 16}[sizes]
    model, _ = fastclip.load("random:tiny", device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(photo_jpegs(count, (500, 375), seed=2)):
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
        plan = plan_job(images=[folder])
        features = {}

        def job(name, preprocess):
            def run():
                dataset = EmbedDataset(plan.chunks, preprocess, 64, True, False,
                                       read_timeout=DEFAULT_READ_TIMEOUT)
                with torch.inference_mode():
                    features[name] = torch.cat([model.encode_image(batch["images"])
                                                for batch in dataset])
            return run

        rounds = Rounds({
            "fastclip (compiled op)": job("op", fastclip.Preprocess(model.visual.input_resolution)),
            "fastclip (PIL path)": job("pil", fastclip.Preprocess(model.visual.input_resolution,
                                                                  fused=False)),
        })
        rounds.warm_up()

        def one_round():
            rounds.run_round()
            assert torch.equal(features["op"], features["pil"]) and len(features["op"]) == count

        benchmark.group = "embed input ceiling"
        benchmark.pedantic(one_round, rounds=EMBED_ROUNDS[sizes], iterations=1)
        record(benchmark, rounds, "embed job reading side, random:tiny model, 1 thread",
               (500, 375), count, "fastclip (PIL path)")
