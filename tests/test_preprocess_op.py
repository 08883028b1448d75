"""The compiled preprocessing op (``fastclip.ops.preprocess``) against OpenAI's torchvision
transform, bit for bit, and its input checks."""

import io
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_preprocess import openai_transform, random_image

from fastclip import Preprocess, transform
from fastclip.images import decode_image
from fastclip.ops import preprocess as fused

pytestmark = pytest.mark.skipif(not fused.available("cpu"),
                                reason="fastclip._C is not built")

ALL_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "YCbCr", "RGBX", "I", "F")


def photo_like(mode, size, seed):
    """Smooth content with noise, as photographs have (random bytes alone rarely make the
    resize overshoot and clip): a small smooth picture scaled up, plus tiled noise, with
    patches of a flat alpha."""
    rng = np.random.default_rng(seed)
    width, height = size
    small = (min(width, rng.integers(2, 40)), min(height, rng.integers(2, 40)))
    base = Image.fromarray(rng.integers(0, 256, (small[1], small[0], 4), dtype=np.uint8),
                           "RGBA").resize(size, Image.BILINEAR)
    noise = np.tile(rng.integers(-25, 26, (64, 64, 4)),
                    (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    data = np.clip(np.asarray(base).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    data[..., 3] = np.where(rng.random((height, width)) < 0.3, rng.integers(0, 256),
                            data[..., 3])
    return Image.fromarray(data, "RGBA").convert(mode)


def generated(rng, index):
    """A random image of the kinds the op must get right: any of the op's modes (and the
    others, through PIL), 1x1 to 4000x3000, extreme aspect ratios, up- and downscaled."""
    mode = rng.choice(("RGB", "RGB", "L", "RGBA", "LA") if index % 10 else ALL_MODES)
    kind = rng.random()
    if kind < 0.1:
        size = (rng.randint(1, 12), rng.randint(1, 12))
    elif kind < 0.2:
        # (Kept to sizes whose full resize, which the reference computes, stays affordable.)
        size = rng.choice([(1, rng.randint(1, 60)), (rng.randint(1, 250), 2),
                           (rng.randint(8, 30), rng.randint(300, 1000))])
    elif kind < 0.95:
        size = (rng.randint(1, 700), rng.randint(1, 700))
    else:
        size = (rng.randint(700, 4000), rng.randint(700, 3000))
    if mode in fused.MODES and rng.random() < 0.6:
        return photo_like(mode, size, index)
    if mode in ("YCbCr", "RGBX", "I", "F"):
        return random_image("RGB", size, index).convert(mode)
    return random_image(mode, size, index)


def assert_identical(expected, got, what):
    if not torch.equal(expected, got):
        difference = (expected.float() - got.float()).abs()
        worst = np.unravel_index(int(difference.argmax()), difference.shape)
        raise AssertionError(f"{what}: {int((difference > 0).sum())} elements differ, the "
                             f"worst by {float(difference.max()):.4g} at {tuple(worst)}")


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_to_openai_on_generated_images(seed):
    rng = random.Random(seed)
    for index in range(1000):
        image = generated(rng, seed * 10_000 + index)
        n_px = rng.choice((224, 224, 336, 288, 64, 7, 1))
        assert_identical(openai_transform(n_px)(image), Preprocess(n_px)(image),
                         f"{image.mode} {image.size} at {n_px}")


@pytest.mark.parametrize("form", ["JPEG", "PNG"])
def test_identical_on_decoded_files(form):
    rng = random.Random(3)
    for index in range(60):
        mode = rng.choice(("RGB", "L") if form == "JPEG" else ("RGB", "L", "RGBA", "LA", "P"))
        image = photo_like("RGB" if mode == "P" else mode,
                           (rng.randint(1, 900), rng.randint(1, 900)), index)
        if mode == "P":
            image = image.convert("P")
        buffer = io.BytesIO()
        image.save(buffer, form, quality=90) if form == "JPEG" else image.save(buffer, form)
        decoded = decode_image(buffer.getvalue())
        assert_identical(openai_transform(224)(decoded), Preprocess(224)(decoded),
                         f"{form} {mode} {image.size}")


def available_sets(*names):
    """The instruction sets of ``names`` that this CPU runs."""
    sets = []
    for isa in names:
        try:
            sets.append(torch.ops.fastclip.preprocess_isa(isa))
        except RuntimeError:
            continue
    torch.ops.fastclip.preprocess_isa("best")
    return sets


def test_every_compiled_instruction_set():
    """The AVX-512, AVX2 and portable builds of the CPU kernels, and the CUDA kernels' code run
    on the CPU, give OpenAI's bytes (each build the CPU runs; the portable one and the CUDA
    code always)."""
    sets = available_sets("avx512", "avx2", "portable", "cuda-on-cpu")
    assert "portable" in sets and "cuda-on-cpu" in sets
    rng = random.Random(5)
    images = [generated(rng, i) for i in range(100)]
    expected = [openai_transform(224)(image) for image in images]
    try:
        for isa in sets:
            torch.ops.fastclip.preprocess_isa(isa)
            for image, reference in zip(images, expected):
                assert_identical(reference, Preprocess(224)(image),
                                 f"{isa}: {image.mode} {image.size}")
    finally:
        torch.ops.fastclip.preprocess_isa("best")


def test_instruction_sets_agree_on_noise_at_every_scale():
    """The vectorised filters and the CUDA kernels' code against the portable loops on noise
    (every sum clipped, both ways), for each channel count, down- and upscaled by factors of
    1/40 to 20 (filters of 3 to over 200 taps), both pass orders, crops and padding, into
    fp32 and fp16."""
    sets = available_sets("avx512", "avx2", "cuda-on-cpu")
    assert "cuda-on-cpu" in sets
    rng = random.Random(11)
    cases = []
    for _ in range(60):
        height, width = rng.randint(1, 700), rng.randint(1, 700)
        channels, size = rng.choice((1, 2, 3, 4)), rng.choice((1, 7, 16, 33, 64, 224))
        resized = (max(1, int(height * rng.uniform(0.025, 1.5))) if rng.random() < 0.8
                   else rng.randint(1, 20 * height),
                   max(1, int(width * rng.uniform(0.025, 1.5))))
        offset = (rng.randint(-8, max(resized[0] - size, 0) + 8),
                  rng.randint(-8, max(resized[1] - size, 0) + 8))
        dtype = rng.choice((torch.float32, torch.float16))
        image = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(rng.randint(0, 1 << 30)))
        cases.append((image, resized, offset, dtype, size, rng.random() < 0.5))

    def run(case):
        image, resized, offset, dtype, size, vertical = case
        out = torch.full((3, size, size), float("nan"), dtype=dtype)
        torch.ops.fastclip.resize_crop_normalize(
            image, list(resized), list(offset), transform.normalization_table(dtype=dtype), out,
            vertical)
        return out

    try:
        torch.ops.fastclip.preprocess_isa("portable")
        expected = [run(case) for case in cases]
        for isa in sets:
            torch.ops.fastclip.preprocess_isa(isa)
            for case, reference in zip(cases, expected):
                image, resized, offset, dtype, size, vertical = case
                assert_identical(reference, run(case),
                                 f"{isa}: {tuple(image.shape)} to {resized} at {offset}, "
                                 f"crop {size}, {dtype}, vertical first {vertical}")
    finally:
        torch.ops.fastclip.preprocess_isa("best")


def strided_batch(images, layout):
    """``images`` ((N, H, W, C) uint8) as a batch of other strides on its device, the same
    values: as it is, every other image of a larger batch inside a margin, or planes
    (N, C, H, W) permuted."""
    count, height, width, channels = images.shape
    if layout == "contiguous":
        return images.contiguous()
    if layout == "planes":
        return images.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    larger = torch.zeros(2 * count, height + 3, width + 5, channels, dtype=torch.uint8,
                         device=images.device)
    larger[::2, 1:1 + height, 2:2 + width] = images
    return larger[::2, 1:1 + height, 2:2 + width]


def strided_out(count, size, dtype, layout, device="cpu"):
    """An out (N, 3, size, size) of NaNs (which no written value equals) laid out as
    ``layout`` says: contiguous, channels last ("planes"), or every other row of a larger
    one ("margins")."""
    if layout == "contiguous":
        return torch.full((count, 3, size, size), float("nan"), dtype=dtype, device=device)
    if layout == "planes":
        return torch.full((count, size, size, 3), float("nan"), dtype=dtype,
                          device=device).permute(0, 3, 1, 2)
    return torch.full((count, 3, 2 * size, size), float("nan"), dtype=dtype,
                      device=device)[:, :, ::2]


@pytest.mark.parametrize("layout", ["contiguous", "margins", "planes"])
def test_batches_of_any_strides_in_every_variant(layout):
    """A batch of one size in one call, image and out of any strides (a channels-last out, or
    every other row of a larger one), gives each image's tensor alone, contiguous, through the
    portable loops: in every build the CPU runs and in the CUDA kernels' code, which runs a
    batch as one launch of each pass over all its images. The first batch is empty."""
    sets = available_sets("avx512", "avx2", "portable", "cuda-on-cpu")
    rng = random.Random({"contiguous": 21, "margins": 22, "planes": 23}[layout])
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    cases = []
    for index in range(24):
        count, channels = rng.randint(1, 4), rng.choice((1, 2, 3, 4))
        height, width = rng.randint(1, 300), rng.randint(1, 300)
        size = rng.choice((1, 7, 33, 64))
        resized = (max(1, int(height * rng.uniform(0.05, 3))),
                   max(1, int(width * rng.uniform(0.05, 3))))
        offset = (rng.randint(-4, max(resized[0] - size, 0) + 4),
                  rng.randint(-4, max(resized[1] - size, 0) + 4))
        images = torch.randint(0, 256, (count if index else 0, height, width, channels),
                               dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
        cases.append((images, resized, offset, size, dtypes[index % 4], index % 3 == 0))

    def call(images, resized, offset, table, out, vertical):
        torch.ops.fastclip.resize_crop_normalize(images, list(resized), list(offset), table,
                                                 out, vertical)
        return out

    try:
        torch.ops.fastclip.preprocess_isa("portable")
        expected = []
        for images, resized, offset, size, dtype, vertical in cases:
            table = transform.normalization_table(dtype=dtype)
            expected.append(torch.stack([
                call(image, resized, offset, table, torch.empty(3, size, size, dtype=dtype),
                     vertical) for image in images]) if len(images) else
                torch.empty(0, 3, size, size, dtype=dtype))
        for isa in sets:
            torch.ops.fastclip.preprocess_isa(isa)
            for case, reference in zip(cases, expected):
                images, resized, offset, size, dtype, vertical = case
                out = strided_out(len(images), size, dtype, layout)
                call(strided_batch(images, layout), resized, offset,
                     transform.normalization_table(dtype=dtype), out, vertical)
                assert_identical(reference, out,
                                 f"{isa}: {tuple(images.shape)} to {resized} at {offset}, "
                                 f"crop {size}, {dtype}, vertical first {vertical}")
    finally:
        torch.ops.fastclip.preprocess_isa("best")


def test_unknown_instruction_set_is_refused():
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        torch.ops.fastclip.preprocess_isa("sse9")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_into_other_dtypes(dtype):
    """Into a batch of another dtype: OpenAI's tensor (fp32, the default dtype) converted once
    (what ``encode_image`` does with it), whichever path computes it."""
    for index, mode in enumerate(("RGB", "L", "RGBA", "CMYK")):
        image = photo_like(mode, (300 + 17 * index, 200), index)
        batch = torch.zeros(2, 3, 224, 224, dtype=dtype)
        Preprocess(224).into(image, batch[1])
        assert_identical(openai_transform(224)(image).to(dtype), batch[1], f"{dtype} {mode}")
        assert not batch[0].any()


def test_default_dtype_float64():
    """With fp64 as the default dtype, torchvision computes in fp64, and so does the op's
    table; the check against Pillow runs (first use in the process) without failing."""
    transform.fused_agrees_with_pillow.cache_clear()
    with torch_default_dtype(torch.float64):
        image = photo_like("RGBA", (250, 190), 4)
        assert Preprocess(224).path == "compiled op"
        expected = openai_transform(224)(image)
        assert expected.dtype == torch.float64
        assert_identical(expected, Preprocess(224)(image), "fp64")


class torch_default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def test_batches_strides_and_channel_first_input():
    images = [photo_like("RGB", (320, 240), seed) for seed in range(3)]
    data = torch.stack([torch.from_numpy(np.array(image)) for image in images])  # N, H, W, C
    expected = torch.stack([openai_transform(224)(image) for image in images])
    out = torch.empty(3, 3, 224, 224)
    fused.resize_crop_normalize(data, (224, 298), transform.normalization_table(), out)
    assert_identical(expected, out, "batch")
    # A (C, H, W) image (as torchvision decodes) read through a permuted view, written into a
    # channels-last batch.
    chw = data[1].permute(2, 0, 1).contiguous()
    target = torch.empty(1, 224, 224, 3).permute(0, 3, 1, 2)
    fused.resize_crop_normalize(chw.permute(1, 2, 0), (224, 298),
                                transform.normalization_table(), target[0])
    assert_identical(expected[1], target[0], "channels-first input, channels-last output")


def test_pass_order_follows_pillow():
    """A tall image is resized vertically first by Pillow 13: the op follows the order the
    installed Pillow was found to follow, and the other order gives other bytes (so the rule
    is tested)."""
    assert Preprocess(224).path == "compiled op"
    image = photo_like("RGB", (230, 900), 7)
    width, height = image.size
    new_width, new_height = transform.resized_size(width, height, 224)
    expected = np.asarray(image.resize((new_width, new_height), Image.BICUBIC))
    identity = torch.arange(256, dtype=torch.float32).expand(3, 256).contiguous()
    pixels, _ = fused.pixels(image)
    results = {}
    for vertical in (False, True):
        got = torch.empty(3, new_height, new_width)
        fused.resize_crop_normalize(pixels, (new_height, new_width), identity, got, vertical)
        results[vertical] = np.array_equal(got.permute(1, 2, 0).numpy(), expected)
    rule = fused.vertical_first(width, height, new_width, new_height)
    assert results[rule] and not results[not rule]


def test_pass_order_is_detected():
    """Told the wrong order, the check against Pillow finds the right one among those
    Pillow has had."""
    right = (Preprocess(224).path, fused.pass_order())
    wrong = next(name for name in fused.PASS_ORDERS if name != right[1])
    fused.use_pass_order(wrong)
    transform.fused_agrees_with_pillow.cache_clear()
    assert (Preprocess(224).path, fused.pass_order()) == right


def test_mismatch_with_pillow_falls_back_to_pil(monkeypatch):
    # Every order the op knows made wrong: the probes must catch it.
    monkeypatch.setattr(fused, "PASS_ORDERS", {name: (lambda *size: True)
                                               for name in fused.PASS_ORDERS})
    transform.fused_agrees_with_pillow.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert Preprocess(224).path == "PIL"
        assert any("does not match the installed Pillow" in str(w.message) for w in caught)
        image = photo_like("RGB", (300, 200), 1)
        assert_identical(openai_transform(224)(image), Preprocess(224)(image), "fallback")
    finally:
        monkeypatch.undo()
        transform.fused_agrees_with_pillow.cache_clear()
    assert Preprocess(224).path == "compiled op"
    assert Preprocess(224, fused=False).path == "PIL"


def test_memory_mapped_and_borrowed_images(tmp_path):
    """Images over memory PIL does not own (a file PIL maps, Image.frombuffer) are copied,
    not read in place (PIL cannot export them, and their rows may run another way)."""
    grey = photo_like("L", (301, 257), 3)
    path = tmp_path / "grey.pgm"
    grey.save(path)
    mapped = Image.open(path)
    mapped.load()
    assert_identical(openai_transform(224)(grey), Preprocess(224)(mapped), "mapped PGM")
    data = np.asarray(photo_like("RGBA", (260, 300), 4)).tobytes()
    borrowed = Image.frombuffer("RGBA", (260, 300), data, "raw", "RGBA", 0, -1)
    assert_identical(openai_transform(224)(borrowed.copy()), Preprocess(224)(borrowed),
                     "bottom-up frombuffer")


def test_sides_beyond_the_op_take_pils_path(monkeypatch):
    monkeypatch.setattr(fused, "MAX_SIDE", 100)

    def refused(*args):
        raise AssertionError("the op was called beyond its limit")

    monkeypatch.setattr(fused, "resize_crop_normalize", refused)
    image = photo_like("RGB", (300, 200), 5)
    assert_identical(openai_transform(224)(image), Preprocess(224)(image), "beyond MAX_SIDE")


def test_images_in_several_blocks_are_copied():
    """PIL keeps an image over its block size in several blocks, which it cannot export in
    place: those are copied, and give the same tensor."""
    image = photo_like("RGB", (3000, 2000), 2)  # 24 MB of RGBX, over PIL's 16 MB blocks
    tensor, owner = fused._arrow_pixels(image)
    assert tensor is None
    small = photo_like("RGB", (300, 200), 2)
    tensor, owner = fused._arrow_pixels(small)
    assert tensor is not None and torch.equal(tensor, torch.from_numpy(np.asarray(small)))
    assert_identical(openai_transform(224)(image), Preprocess(224)(image), "large image")


def call(image=None, resized=(4, 4), offset=(0, 0), table=None, out=None, vertical=False):
    image = torch.zeros(6, 5, 3, dtype=torch.uint8) if image is None else image
    table = transform.normalization_table() if table is None else table
    out = torch.empty(3, 4, 4) if out is None else out
    torch.ops.fastclip.resize_crop_normalize(image, list(resized), list(offset), table, out,
                                             vertical)


@pytest.mark.parametrize("arguments, message", [
    ({"image": torch.zeros(6, 5, 3)}, "image must hold 8-bit pixels"),
    ({"image": torch.zeros(6, 5, dtype=torch.uint8)}, r"image must be \(H, W, C\)"),
    ({"image": torch.zeros(3, 6, 5, dtype=torch.uint8).permute(0, 1, 2)}, "has 5 channels"),
    ({"image": torch.zeros(0, 5, 3, dtype=torch.uint8)}, "has no pixels"),
    ({"resized": (0, 4)}, "must be positive"),
    ({"resized": (1 << 25, 4)}, "are not supported"),
    ({"out": torch.empty(4, 4, 3)}, "out must have 3 channels first"),
    ({"out": torch.empty(2, 3, 4, 4)}, r"out must be \(3, H, W\) for an \(H, W, C\) image"),
    ({"out": torch.empty(3, 4, 4, dtype=torch.int32)}, "out must be float32"),
    ({"table": torch.zeros(3, 255)}, r"table must be the \(3, 256\)"),
    ({"table": torch.zeros(3, 256, dtype=torch.float64)}, "table must be"),
])
def test_input_errors_name_the_input(arguments, message):
    with pytest.raises(RuntimeError, match=message):
        call(**arguments)


def test_batch_size_must_match():
    with pytest.raises(RuntimeError, match="out holds 3 images but the batch has 2"):
        call(image=torch.zeros(2, 6, 5, 3, dtype=torch.uint8), out=torch.empty(3, 3, 4, 4))


def test_preprocess_into_checks_out():
    with pytest.raises(ValueError, match=r"out must be a \(3, 224, 224\) tensor"):
        Preprocess(224).into(photo_like("RGB", (20, 20), 0), torch.empty(3, 10, 10))


def compare_cuda_kernels_with_cpu_op(run_kernels, what):
    """``run_kernels(pixels, resized, table, out, vertical)`` (the CUDA kernels, on a GPU or
    their code on the CPU) against the CPU op on 300 generated images, fp32 and bf16."""
    rng = random.Random(9)
    for index in range(300):
        image = generated(rng, index)
        if image.mode not in fused.MODES:
            continue
        n_px = rng.choice((224, 336, 7))
        width, height = image.size
        new_width, new_height = transform.resized_size(width, height, n_px)
        vertical = fused.vertical_first(width, height, new_width, new_height)
        pixels, _ = fused.pixels(image)
        for dtype in (torch.float32, torch.bfloat16):
            table = transform.normalization_table(dtype=dtype)
            cpu = torch.empty(3, n_px, n_px, dtype=dtype)
            fused.resize_crop_normalize(pixels, (new_height, new_width), table, cpu, vertical)
            got = run_kernels(pixels, (new_height, new_width), table,
                              torch.full((3, n_px, n_px), float("nan"), dtype=dtype), vertical)
            assert_identical(cpu, got, f"{what} {image.mode} {image.size} {dtype}")


def test_cuda_kernels_code_on_cpu_equals_cpu_op():
    """The CUDA kernels' element code and the host code around it (csrc/resize_kernels.h),
    run on the CPU: what a GPU runs, without one."""
    def on_cpu(pixels, resized, table, out, vertical):
        torch.ops.fastclip.preprocess_isa("cuda-on-cpu")
        try:
            return fused.resize_crop_normalize(pixels, resized, table, out, vertical)
        finally:
            torch.ops.fastclip.preprocess_isa("best")

    compare_cuda_kernels_with_cpu_op(on_cpu, "cuda-on-cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not fused.available("cuda") or not torch.cuda.is_available(),
                    reason="needs a GPU and fastclip._C's CUDA kernels")
def test_cuda_kernel_equals_cpu_op():
    def on_gpu(pixels, resized, table, out, vertical):
        gpu = out.cuda()
        fused.resize_crop_normalize(pixels.cuda(), resized, table.cuda(), gpu, vertical)
        return gpu.cpu()

    compare_cuda_kernels_with_cpu_op(on_gpu, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not fused.available("cuda") or not torch.cuda.is_available(),
                    reason="needs a GPU and fastclip._C's CUDA kernels")
@pytest.mark.parametrize("layout", ["contiguous", "margins", "planes"])
def test_cuda_batches_of_any_strides_equal_cpu_op(layout):
    """Batches in one call on the GPU, image and out of any strides, against the CPU op."""
    rng = random.Random(31)
    for index in range(12):
        count, channels = rng.randint(0 if index == 0 else 1, 4), rng.choice((1, 2, 3, 4))
        height, width, size = rng.randint(1, 300), rng.randint(1, 300), rng.choice((7, 64))
        resized = (max(1, int(height * rng.uniform(0.05, 3))),
                   max(1, int(width * rng.uniform(0.05, 3))))
        offset = (rng.randint(-4, max(resized[0] - size, 0) + 4),
                  rng.randint(-4, max(resized[1] - size, 0) + 4))
        images = torch.randint(0, 256, (count, height, width, channels), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(index))
        table = transform.normalization_table(dtype=torch.float16)
        cpu = torch.empty(count, 3, size, size, dtype=torch.float16)
        torch.ops.fastclip.resize_crop_normalize(images, list(resized), list(offset), table,
                                                 cpu, index % 2 == 0)
        gpu = strided_out(count, size, torch.float16, layout, "cuda")
        torch.ops.fastclip.resize_crop_normalize(strided_batch(images.cuda(), layout),
                                                 list(resized), list(offset), table.cuda(),
                                                 gpu, index % 2 == 0)
        assert_identical(cpu, gpu.cpu(), f"cuda batch {tuple(images.shape)} to {resized}")


def test_embed_batches_are_filled_in_place(tmp_path):
    """The embed job's workers preprocess into the batch tensor: each batch's images are its
    buffer's rows, equal to OpenAI's tensors, across batch boundaries (a tar shard is read in
    one pass, so the sample read past a full batch opens the next) and failed inputs."""
    from fastclip.embed.plan import plan_job
    from fastclip.embed.reader import EmbedDataset

    from embed_helpers import write_tar_shard
    samples, images = [], {}
    for i in range(11):
        if i in (3, 9):
            samples.append((f"s{i:02d}", {"jpg": b"not an image"}))
            continue
        image = photo_like("RGB", (90 + 7 * i, 70), i)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        samples.append((f"s{i:02d}", {"png": buffer.getvalue()}))
        images[f"s{i:02d}"] = image
    shard = tmp_path / "shard.tar"
    write_tar_shard(shard, samples)
    plan = plan_job(images=[str(shard)])
    batches = list(EmbedDataset(plan.chunks, Preprocess(64), 4, True, False))
    assert [len(batch["rows"]) for batch in batches] == [4, 4, 1]
    for batch in batches:
        tensor = batch["images"]
        assert tensor.untyped_storage().nbytes() == 5 * 3 * 64 * 64 * 4  # the buffer, uncopied
        for row, image in zip(batch["rows"], tensor):
            assert_identical(openai_transform(64)(images[row["image_path"]]), image,
                             row["image_path"])
