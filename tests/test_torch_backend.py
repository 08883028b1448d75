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


needs_onednn = pytest.mark.skipif(not cpu_linear.enabled(),
                                  reason="this PyTorch has no oneDNN (mkldnn) CPU ops")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, size, patch, width", [
    (1, 224, 32, 768), (2, 64, 16, 128), (3, 42, 14, 40), (1, 14, 14, 8)])
def test_patch_embed_as_one_product_matches_the_convolution(dtype, batch, size, patch, width):
    generator = torch.Generator().manual_seed(size)
    x = randn(batch, 3, size, size, dtype=dtype, generator=generator)
    weight = randn(width, 3, patch, patch, dtype=dtype, scale=0.02, generator=generator)
    with torch.no_grad():
        assert cpu_linear.patch_embed(x, weight) is not None, "the packed path should apply"
        actual = torch_backend.patch_embed(x, weight)
        expected = reference.patch_embed(x.double(), weight.double())
        assert_flash_rule(actual, expected, reference.patch_embed(x, weight),
                          f"patch_embed {dtype} {size}/{patch}")


@needs_onednn
def test_patch_embed_takes_any_layout_and_follows_weight_updates():
    generator = torch.Generator().manual_seed(1)
    weight = randn(24, 3, 8, 8, scale=0.1, generator=generator)
    images = [randn(2, 3, 32, 32, generator=generator).to(memory_format=torch.channels_last),
              randn(2, 3, 32, 32, generator=generator).transpose(2, 3),
              randn(2, 3, 64, 32, generator=generator)[:, :, ::2]]
    with torch.no_grad():
        for x in images:
            torch.testing.assert_close(torch_backend.patch_embed(x, weight),
                                       reference.patch_embed(x, weight), rtol=1e-5, atol=1e-5)
        weight.mul_(-2)  # the packed copy must follow
        x = images[0]
        torch.testing.assert_close(torch_backend.patch_embed(x, weight),
                                   reference.patch_embed(x, weight), rtol=1e-5, atol=1e-5)


def test_patch_embed_with_gradients_is_the_convolution():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    weight = torch.randn(8, 3, 4, 4, requires_grad=True)
    assert cpu_linear.patch_embed(x, weight) is None
    torch_backend.patch_embed(x, weight).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference.patch_embed(x2, w2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_patch_embed_refuses_what_is_not_a_patch_grid():
    with torch.no_grad():  # sizes the patches do not divide: the convolution's own answer
        x, weight = torch.randn(1, 3, 30, 30), torch.randn(8, 3, 8, 8)
        assert cpu_linear.patch_embed(x, weight) is None
        assert torch_backend.patch_embed(x, weight).shape == (1, 9, 8)


@needs_onednn
def test_patch_embed_is_an_op_of_compiled_graphs():
    weight = torch.randn(16, 3, 8, 8)
    x = torch.randn(2, 3, 32, 32)
    torch.library.opcheck(torch.ops.fastclip_cpu.patch_embed,
                          (torch.randn(2, 16, 192), weight))
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(torch_backend.patch_embed)(x, weight)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert "fastclip_cpu.patch_embed" in "".join(graph.code for graph in explained.graphs)
        compiled = torch.compile(torch_backend.patch_embed, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, weight), reference.patch_embed(x, weight),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reason", ["weights need gradients", "autocast"])
def test_layer_norm_off_the_cpu_keeps_the_reference_for_training_and_autocast(
        monkeypatch, reason):
    """Rounded weights would round their gradients too (an fp16 dgamma overflows past 65504),
    and autocast computes LayerNorm in fp32 anyway: both take the reference's fp32 path."""
    x, weight, bias = layer_norm_inputs(4, 77, 64, torch.float16, None, device="meta")
    if reason == "autocast":
        # meta tensors have no autocast: the check says what CUDA's would under autocast
        monkeypatch.setattr(torch_backend, "_autocast", lambda device_type: True)
    else:
        weight.requires_grad_()
    calls = log_ops(torch_backend.layer_norm, x, weight, bias, 1e-5)
    assert not any(name == "_to_copy" and tensors[-1] == (torch.float16, weight.numel())
                   for name, tensors in calls), f"weights rounded to fp16: {calls}"
    assert any(name == "_to_copy" and tensors[-1] == (torch.float32, x.numel())
               for name, tensors in calls), f"not the reference's fp32 path: {calls}"


@needs_onednn
def test_patch_embed_of_an_empty_batch():
    with torch.no_grad():
        out = torch_backend.patch_embed(torch.randn(0, 3, 32, 32), torch.randn(8, 3, 8, 8))
    assert out.shape == (0, 16, 8)


@needs_onednn
def test_patch_embed_drops_its_packed_copy_when_the_weight_trains():
    weight = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        torch_backend.patch_embed(torch.randn(1, 3, 8, 8), weight)
    assert weight in cpu_linear._CACHE
    weight.requires_grad_()
    torch_backend.patch_embed(torch.randn(1, 3, 8, 8), weight)
    assert weight not in cpu_linear._CACHE


def test_a_hooked_or_pruned_patch_convolution_is_called_as_a_module():
    import torch.nn.utils.prune as prune

    from fastclip.model import VisionTransformer
    from fastclip.ops.dispatch import TORCH
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 64, 1, 2, 16).eval()
    vit.ops = TORCH
    for module in vit.modules():
        if hasattr(module, "ops"):
            module.ops = TORCH
    x = torch.randn(2, 3, 32, 32)
    calls = []
    handle = vit.conv1.register_forward_hook(lambda module, inputs, output: calls.append(1))
    with torch.no_grad():
        vit(x)
    assert calls, "the forward hook on conv1 did not run"
    handle.remove()
    prune.l1_unstructured(vit.conv1, "weight", 0.5)
    with torch.no_grad():
        vit.conv1.weight_orig.mul_(3)
        tokens = vit.conv1(x).flatten(2).transpose(1, 2)
        expected = vit.ln_post(vit.transformer(vit.ln_pre(torch.cat(
            [vit.class_embedding.expand(2, 1, -1), tokens], 1) + vit.positional_embedding))[:, 0])
        torch.testing.assert_close(vit(x), expected @ vit.proj)


@needs_onednn
def test_the_compiled_graphs_ops_refuse_inputs_that_need_gradients():
    x = torch.randn(2, 5, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        torch.ops.fastclip_cpu.linear(x, torch.randn(8, 16), None)
    with torch.no_grad():
        assert torch.ops.fastclip_cpu.linear(x, torch.randn(8, 16), None).shape == (2, 5, 8)
