"""The torch backend's LayerNorm and MLP off the CPU's packed path (the path CUDA tensors
take, and CPU tensors under autograd): one pass where the reference makes several, with the
reference's answers by flash-attention's rule.

CUDA cannot run here; the same code runs on CPU tensors (for the numbers) and on meta tensors
(for the ops it calls, which are the ops a CUDA tensor gets)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastclip.ops import cpu_linear, reference, torch_backend

from numerics import assert_close_relative, assert_flash_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LENGTHS = [1, 50, 77, 197, 257]


class OpLog(TorchDispatchMode):
    """Every aten op called, with its tensor arguments' and results' (dtype, numel)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = list(args) + list((kwargs or {}).values())
        flat += list(out) if isinstance(out, (tuple, list)) else [out]
        tensors = [(t.dtype, t.numel()) for t in flat if isinstance(t, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, tensors))
        return out


def log_ops(fn, *args):
    with OpLog() as log:
        fn(*args)
    return log.calls


def randn(*shape, dtype=torch.float32, scale=1.0, generator=None, device="cpu"):
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


def layer_norm_inputs(batch, length, width, dtype, generator, device="cpu"):
    # OpenAI's half-precision layout keeps LayerNorm's weights in fp32.
    return (randn(batch, length, width, dtype=dtype, scale=3, generator=generator,
                  device=device) + 1,
            randn(width, scale=0.5, generator=generator, device=device) + 1,
            randn(width, scale=0.2, generator=generator, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_norm_off_the_cpu_makes_no_fp32_copy(dtype):
    """On a device other than the CPU (meta tensors here, CUDA for users), LayerNorm reads
    the input once: no op makes or takes an fp32 tensor of the input's size."""
    x, weight, bias = layer_norm_inputs(4, 77, 512, dtype, None, device="meta")
    calls = log_ops(torch_backend.layer_norm, x, weight, bias, 1e-5)
    big = [(name, tensors) for name, tensors in calls
           if any(numel == x.numel() and t != dtype for t, numel in tensors)]
    assert not big, f"ops on a {torch.float32} copy of the {dtype} input: {big}"
    assert [name for name, _ in calls].count("native_layer_norm") == 1, calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_layer_norm_in_one_dtype_matches_reference(dtype, length):
    generator = torch.Generator().manual_seed(length)
    x, weight, bias = layer_norm_inputs(1 if length > 100 else 2, length, 96, dtype, generator)
    actual = torch_backend._layer_norm_one_dtype(x, weight, bias, 1e-5)
    expected = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5)
    assert_flash_rule(actual, expected, reference.layer_norm(x, weight, bias, 1e-5),
                      f"layer_norm {dtype} L={length}")


def test_layer_norm_in_one_dtype_keeps_the_dtype_under_autocast():
    x, weight, bias = layer_norm_inputs(2, 5, 32, torch.bfloat16, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch_backend._layer_norm_one_dtype(x, weight, bias, 1e-5)
    assert out.dtype == torch.bfloat16


def make_mlp(width, dtype, generator):
    return (randn(4 * width, width, dtype=dtype, scale=width ** -0.5, generator=generator),
            randn(4 * width, dtype=dtype, scale=0.5, generator=generator),
            randn(width, 4 * width, dtype=dtype, scale=(4 * width) ** -0.5, generator=generator),
            randn(width, dtype=dtype, scale=0.1, generator=generator))


@pytest.fixture
def unpacked(monkeypatch):
    """The torch backend's MLP without the CPU's packed oneDNN products: the path CUDA takes."""
    monkeypatch.setattr(cpu_linear, "_ENABLED", False)


def hidden_passes(calls, hidden_numel):
    """The elementwise ops that read or write a tensor of the hidden layer's size."""
    products = {"mm", "addmm", "bmm", "t", "view", "_unsafe_view", "reshape", "expand",
                "transpose", "linear", "matmul"}
    return [name for name, tensors in calls
            if name not in products and any(n == hidden_numel for _, n in tensors)]


@pytest.mark.parametrize("grad", [False, True])
def test_quick_gelu_mlp_passes_over_the_hidden_layer_once(unpacked, grad):
    batch, length, width = 2, 50, 64
    device = "meta"
    x = randn(batch, length, width, device=device)
    args = [a.to(device) for a in make_mlp(width, torch.float32, None)]
    if grad:
        args = [a.requires_grad_() for a in args]
    calls = log_ops(torch_backend.mlp, x, *args, "quick_gelu", randn(batch, length, width,
                                                                      device=device))
    passes = hidden_passes(calls, batch * length * 4 * width)
    assert passes in (["silu_"], ["silu"]), f"passes over the hidden layer: {passes}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_mlp_off_the_packed_path_matches_reference(unpacked, dtype, length, with_residual):
    generator = torch.Generator().manual_seed(length)
    width = 48
    batch = 1 if length > 100 else 3
    x = randn(batch, length, width, dtype=dtype, generator=generator)
    residual = randn(batch, length, width, dtype=dtype, generator=generator) \
        if with_residual else None
    args = make_mlp(width, dtype, generator) + ("quick_gelu",)
    with torch.no_grad():
        actual = torch_backend.mlp(x, *args, residual)
        expected = reference.mlp(x.double(), *[a.double() for a in args[:4]], "quick_gelu",
                                 residual.double() if with_residual else None)
        assert_flash_rule(actual, expected, reference.mlp(x, *args, residual),
                          f"mlp {dtype} L={length}")


def test_mlp_takes_strided_inputs_and_no_biases(unpacked):
    generator = torch.Generator().manual_seed(3)
    x = randn(77, 2, 40, generator=generator).transpose(0, 1)  # (2, 77, 40), not contiguous
    fc_w, _, proj_w, _ = make_mlp(40, torch.float32, generator)
    with torch.no_grad():
        actual = torch_backend.mlp(x, fc_w, None, proj_w, None, "quick_gelu")
        expected = reference.mlp(x.double(), fc_w.double(), None, proj_w.double(), None,
                                 "quick_gelu")
    assert_flash_rule(actual, expected, reference.mlp(x, fc_w, None, proj_w, None,
                                                      "quick_gelu"), "strided mlp")


def test_mlp_gradients_match_reference(unpacked):
    generator = torch.Generator().manual_seed(9)
    x = randn(2, 7, 32, dtype=torch.float64, generator=generator).requires_grad_()
    args = [a.double().requires_grad_() for a in make_mlp(32, torch.float32, generator)]
    torch_backend.mlp(x, *args, "quick_gelu").square().sum().backward()
    grads = [x.grad] + [a.grad for a in args]
    x2 = x.detach().clone().requires_grad_()
    args2 = [a.detach().clone().requires_grad_() for a in args]
    reference.mlp(x2, *args2, "quick_gelu").square().sum().backward()
    for name, got, want in zip(["x", "fc_w", "fc_b", "proj_w", "proj_b"], grads,
                               [x2.grad] + [a.grad for a in args2]):
        assert_close_relative(got, want, 1e-12, f"grad {name}")


def test_gelu_mlp_is_unchanged(unpacked):
    generator = torch.Generator().manual_seed(4)
    x = randn(2, 9, 32, generator=generator)
    args = make_mlp(32, torch.float32, generator)
    with torch.no_grad():
        assert torch.equal(torch_backend.mlp(x, *args, "gelu"),
                           F.linear(F.gelu(F.linear(x, *args[:2])), *args[2:]))
