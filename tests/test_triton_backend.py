"""The triton backend around the kernels: a call a kernel cannot compute runs the torch op,
autocast's mixed dtypes included; the TF32 setting is read however it was set; kernels
launch on their tensors' GPU. Runs in Triton's interpreter without CUDA (``conftest.py``)."""

import contextlib
import sys

import pytest
import torch

from fastclip import kernels
from fastclip.ops import reference, triton_backend

from numerics import cosine
from small_models import clip_inputs, small_clip

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def test_shapes_the_kernels_cannot_compute_run_the_torch_op():
    """Head dim 16 (random:tiny's text tower), a sequence of 1,025 tokens (ViT-L/14 at 448
    px), a width over 4,096: each op falls back, the others keep their kernels."""
    torch.manual_seed(0)
    triton_backend.clear_fallbacks()
    qkv = torch.randn(1, 5, 3 * 2 * 16, device=DEVICE)
    reference_out = reference.attention(qkv, 2, True)
    torch.testing.assert_close(triton_backend.attention(qkv, 2, True), reference_out)
    wide = torch.randn(2, 4100, device=DEVICE)
    ones = torch.ones(4100, device=DEVICE)
    torch.testing.assert_close(triton_backend.layer_norm(wide, ones, None, 1e-5),
                               reference.layer_norm(wide, ones, None, 1e-5))
    long_qkv = torch.randn(1, 1025, 3 * 32, device=DEVICE)
    if CUDA:  # the interpreter would take minutes over 1,025 tokens; the refusal is the point
        triton_backend.attention(long_qkv, 1, False)
    assert kernels.attention_refusal(long_qkv, 1) is not None
    seen = triton_backend.fallbacks()
    assert any(key.startswith("attention:") and "head dim 16" in key for key in seen), seen
    assert any(key.startswith("layer_norm:") and "4096" in key for key in seen), seen
    supported = torch.randn(1, 5, 3 * 64, device=DEVICE)
    before = dict(triton_backend.fallbacks())
    triton_backend.attention(supported, 1, False)
    assert triton_backend.fallbacks() == before  # a shape the kernel computes does not fall back


def test_autocast_inference_through_the_triton_backend():
    """Autocast gives ops inputs of mixed dtypes (bf16 activations, fp32 weights and
    residuals): those ops take PyTorch's autocast path instead of failing."""
    model = small_clip(vision_patch_size=32, vocab_size=1000).to(DEVICE)
    images, texts = clip_inputs(DEVICE)
    device_type = "cuda" if CUDA else "cpu"
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
        expected = model.set_backend("torch").encode_text(texts).float()
        got = model.set_backend("triton").encode_text(texts).float()
        image_expected = model.set_backend("torch").encode_image(images).float()
        image_got = model.set_backend("triton").encode_image(images).float()
    assert cosine(got, expected).min() > 0.99
    assert cosine(image_got, image_expected).min() > 0.99


def test_tf32_set_the_newer_way_does_not_break_the_kernels():
    common = sys.modules["fastclip.kernels.common"]
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else None
    if saved is None:
        pytest.skip("this torch has no fp32_precision setting")
    try:
        matmul.fp32_precision = "tf32"
        assert common.dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert common.dot_precision(torch.float32) == "ieee"
        assert common.dot_precision(torch.float16) == "tf32"
    finally:
        matmul.fp32_precision = saved


def test_kernels_launch_on_their_tensors_gpu(monkeypatch):
    """The launch guard picks the tensor's device, not the current one."""
    common = sys.modules["fastclip.kernels.common"]
    entered = []

    class FakeCudaTensor:
        is_cuda = True
        device = torch.device("cuda", 1)

    def device(target):
        entered.append(target)
        return contextlib.nullcontext()

    monkeypatch.setattr(common.torch.cuda, "device", device)
    with common.on_device_of(FakeCudaTensor()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with common.on_device_of(torch.zeros(1)):  # CPU tensors (the interpreter) need no guard
        pass
    assert len(entered) == 1
