"""The CPU path on prepacked oneDNN weights (``fastclip.ops.cpu_linear``) against the reference.

Tolerances follow flash-attention's rule: the error against a float64 reference is at most
twice PyTorch's own error in the same dtype, plus a few units of the dtype's rounding. The
cache tests change weights every way a user does and check the next result follows.
"""

import gc

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.model import convert_weights
from fastclip.ops import cpu_linear, reference

from numerics import assert_close_relative, assert_flash_rule, cosine
from small_models import small_clip

pytestmark = pytest.mark.skipif(not cpu_linear.enabled(),
                                reason="this PyTorch has no oneDNN (mkldnn) CPU ops")

DTYPES = [torch.float32] + ([torch.bfloat16] if torch.bfloat16 in cpu_linear._DTYPES else [])
def randn(*shape, dtype=torch.float32, scale=1.0, generator=None):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def make_mlp(width, dtype, generator):
    return (randn(4 * width, width, dtype=dtype, scale=width ** -0.5, generator=generator),
            randn(4 * width, dtype=dtype, scale=0.1, generator=generator),
            randn(width, 4 * width, dtype=dtype, scale=(4 * width) ** -0.5, generator=generator),
            randn(width, dtype=dtype, scale=0.1, generator=generator))


def as_double(args):
    return [a.double() if torch.is_tensor(a) else a for a in args]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (3, 77), (2, 197), (1, 257), (5,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(shape, dtype, bias):
    generator = torch.Generator().manual_seed(sum(shape))
    x = randn(*shape, 96, dtype=dtype, generator=generator)
    weight = randn(288, 96, dtype=dtype, scale=96 ** -0.5, generator=generator)
    b = randn(288, dtype=dtype, generator=generator) if bias else None
    with torch.no_grad():
        actual = cpu_linear.linear(x, weight, b)
        expected = F.linear(*as_double([x, weight, b]))
        assert_flash_rule(actual, expected, F.linear(x, weight, b), f"linear {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_takes_strided_inputs(dtype):
    """A transposed activation, a weight that is a slice of a larger one, a strided bias."""
    generator = torch.Generator().manual_seed(3)
    x = randn(50, 3, 64, dtype=dtype, generator=generator).transpose(0, 1)
    big = randn(256, 128, dtype=dtype, scale=0.1, generator=generator)
    weight = big[::2, 32:96]
    b = randn(256, dtype=dtype, generator=generator)[::2]
    assert not (x.is_contiguous() or weight.is_contiguous() or b.is_contiguous())
    with torch.no_grad():
        actual = cpu_linear.linear(x, weight, b)
        expected = F.linear(*as_double([x, weight, b]))
        assert_flash_rule(actual, expected, F.linear(x, weight, b), f"strided linear {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("length", [1, 50, 77, 197, 257])
@pytest.mark.parametrize("with_residual", [False, True])
def test_mlp_matches_reference(activation, length, dtype, with_residual):
    generator = torch.Generator().manual_seed(length)
    width = 64
    batch = 1 if length > 100 else 2
    x = randn(batch, length, width, dtype=dtype, generator=generator)
    residual = randn(batch, length, width, dtype=dtype, generator=generator) \
        if with_residual else None
    args = make_mlp(width, dtype, generator) + (activation,)
    with torch.no_grad():
        actual = cpu_linear.mlp(x, *args, residual)
        assert actual is not None, "the packed path should apply to CPU tensors without grad"
        expected = reference.mlp(x.double(), *as_double(args),
                                 residual.double() if with_residual else None)
        assert_flash_rule(actual, expected, reference.mlp(x, *args, residual),
                          f"mlp {activation} L={length} {dtype}")


def test_gradients_take_the_plain_path():
    """With autograd recording, the products are F.linear's, and gradients are right."""
    generator = torch.Generator().manual_seed(6)
    x = randn(2, 7, 32, generator=generator).requires_grad_()
    args = [a.requires_grad_() for a in make_mlp(32, torch.float32, generator)]
    assert cpu_linear.mlp(x, *args, "quick_gelu") is None
    out = fastclip.ops.TORCH.mlp(x, *args, "quick_gelu")
    out.square().sum().backward()
    grads = [x.grad] + [a.grad for a in args]
    x2 = x.detach().double().requires_grad_()
    args2 = [a.detach().double().requires_grad_() for a in args]
    reference.mlp(x2, *args2, "quick_gelu").square().sum().backward()
    for name, got, want in zip(["x", "fc_w", "fc_b", "proj_w", "proj_b"], grads,
                               [x2.grad] + [a.grad for a in args2]):
        assert_close_relative(got, want, 1e-5, f"grad {name}")


def test_unsupported_inputs_fall_back():
    weight = torch.randn(8, 4)
    assert not cpu_linear.usable(torch.randn(3, 4, dtype=torch.float64), weight.double())
    assert not cpu_linear.usable(torch.randn(3, 4, dtype=torch.float16), weight.half())
    assert not cpu_linear.usable(torch.randn(3, 4), weight.double())  # mixed dtypes
    assert not cpu_linear.usable(torch.randn(4), weight)  # a vector
    with torch.no_grad():
        assert cpu_linear.usable(torch.randn(3, 4), weight)
        # Results are still right where the path does not apply.
        x = torch.randn(3, 4, dtype=torch.float64)
        assert torch.equal(cpu_linear.linear(x, weight.double()), F.linear(x, weight.double()))


def test_switched_off(monkeypatch):
    assert "float32" in fastclip.info()["cpu_prepacked_linear"]
    monkeypatch.setattr(cpu_linear, "_ENABLED", False)
    assert fastclip.info()["cpu_prepacked_linear"] == []
    with torch.no_grad():
        assert not cpu_linear.usable(torch.randn(3, 4), torch.randn(8, 4))
        assert cpu_linear.mlp(torch.randn(3, 4), *make_mlp(4, torch.float32, None),
                              "quick_gelu") is None


def small_vit(**overrides):
    """A smaller variant of the tests' small CLIP, on the torch backend."""
    return small_clip(seed=7, **{**dict(embed_dim=32, image_resolution=32, vision_width=64,
                                        vision_patch_size=8, context_length=16,
                                        transformer_width=64, transformer_heads=1),
                                 **overrides}).set_backend("torch")


def encode(model, images):
    with torch.no_grad():
        return model.encode_image(images)


def assert_matches_reference(model, images):
    """The model on the torch backend (the oneDNN path) gives the reference's embeddings; the
    model is left on the torch backend."""
    actual = encode(model.set_backend("torch"), images)
    expected = encode(model.set_backend("reference"), images)
    model.set_backend("torch")
    assert_close_relative(actual, expected, 1e-5)


def test_cache_follows_load_state_dict():
    model = small_vit()
    other = small_vit()
    for param in other.parameters():
        param.data.normal_(0, 0.05)
    images = torch.randn(2, 3, 32, 32)
    encode(model, images)  # fills the cache
    model.load_state_dict(other.state_dict())
    assert_close_relative(encode(model, images),
                          encode(other.set_backend("reference"), images), 1e-5)


def test_cache_follows_in_place_updates_and_training():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    before = encode(model, images)
    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(2)
    after = encode(model, images)
    assert not torch.allclose(before, after, atol=1e-4)
    assert_matches_reference(model, images)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.encode_image(images).square().sum().backward()
    optimizer.step()
    model.eval()
    assert_matches_reference(model, images)


def test_cache_follows_dtype_round_trips():
    """fp32 -> bf16 -> fp32 gives new storages (maybe at old addresses) of the same shapes."""
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    first = encode(model, images)
    for dtype in DTYPES[1:]:
        half = encode(convert_weights(model, dtype), images)
        assert half.dtype == dtype
        assert cosine(half.float(), first).min() > 0.999
    model.float()  # the weights are now bf16-rounded: a stale fp32 copy would differ by 1e-3
    assert_matches_reference(model, images)
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data * 0.5  # replaced, not written in place
    assert_matches_reference(model, images)


def test_writes_through_data_need_clear_cache():
    """Documented: ``.data`` writes bypass the version counter; clear_cache() picks them up."""
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    encode(model, images)
    for param in model.parameters():
        param.data.mul_(1.5)
    cpu_linear.clear_cache()
    assert_matches_reference(model, images)


def test_weights_made_under_inference_mode():
    """Weights made inside inference_mode are inference tensors, without a version counter:
    they are never cached (an in-place load_state_dict there would go unseen), and still run
    through oneDNN."""
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model = small_vit()
        for dtype in DTYPES:
            model = convert_weights(model, dtype)
            fc = model.visual.transformer.resblocks[0].mlp.c_fc.weight
            assert fc.is_inference()
            before = len(cpu_linear._CACHE)
            assert cosine(model.encode_image(images).float(),
                          model.set_backend("reference").encode_image(images).float()
                          ).min() > 0.9999
            assert len(cpu_linear._CACHE) == before and fc not in cpu_linear._CACHE
            model.set_backend("torch")
        model = convert_weights(model, torch.float32)
        model.encode_image(images)
        other = small_vit()
        for param in other.parameters():
            param.mul_(1.5)
        model.load_state_dict(other.state_dict())  # in place, with no version counter
        assert_close_relative(model.encode_image(images),
                              other.set_backend("reference").encode_image(images), 1e-5)


def test_forward_mode_gradients_take_the_plain_path():
    """Dual tensors (forward_ad, torch.func.jvp) carry no requires_grad: the oneDNN ops
    would drop their tangents, so these go through F.linear."""
    from torch.autograd import forward_ad
    generator = torch.Generator().manual_seed(8)
    x, tangent = randn(3, 5, 16, generator=generator), randn(3, 5, 16, generator=generator)
    weight, bias = randn(24, 16, generator=generator), randn(24, generator=generator)
    mlp_args = make_mlp(16, torch.float32, generator) + ("quick_gelu",)
    for name, fn in [("linear", lambda v: cpu_linear.linear(v, weight, bias)),
                     ("mlp", lambda v: fastclip.ops.TORCH.mlp(v, *mlp_args))]:
        reference_fn = {"linear": lambda v: F.linear(v, weight, bias),
                        "mlp": lambda v: reference.mlp(v, *mlp_args)}[name]
        _, expected = torch.func.jvp(reference_fn, (x,), (tangent,))
        with torch.no_grad():
            _, actual = torch.func.jvp(fn, (x,), (tangent,))
        assert_close_relative(actual, expected, 1e-5, f"{name} jvp tangent")
        with forward_ad.dual_level():
            dual = fn(forward_ad.make_dual(x, tangent))
            unpacked = forward_ad.unpack_dual(dual).tangent
        assert unpacked is not None, f"{name}: forward_ad lost the tangent"
        assert_close_relative(unpacked, expected, 1e-5, f"{name} forward_ad tangent")


def test_jit_trace_takes_the_plain_path():
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model.visual, images, check_trace=False)
        assert_close_relative(traced(images), model.visual(images), 1e-5)


def test_copies_go_when_the_model_moves_to_another_dtype():
    """After model.half(), the fp32 storages are freed and the first fp16 call drops the
    packed copies: the cache holds no memory for weights that no longer use it."""
    from torch.multiprocessing.reductions import StorageWeakRef
    model = small_vit()
    images = torch.randn(2, 3, 32, 32)
    encode(model, images)
    fc = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert fc in cpu_linear._CACHE
    old_storage = StorageWeakRef(fc.untyped_storage())
    model.half()
    gc.collect()
    assert old_storage.expired(), "the cache kept the fp32 weights' memory"
    encode(model, images.half())  # fp16 does not take the path here
    assert fc not in cpu_linear._CACHE


def test_cache_lets_weights_go():
    model = small_vit()
    encode(model, torch.randn(1, 3, 32, 32))
    count = len(cpu_linear._CACHE)
    assert count >= 4 * 2  # in_proj, out_proj, c_fc, c_proj of each visual block
    del model
    gc.collect()
    assert len(cpu_linear._CACHE) <= count - 8


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no oneDNN bf16 on this CPU")
def test_bf16_vit_close_to_fp32():
    """The bf16 model on the packed path (QuickGELU folded into the weights) stays close."""
    model = small_vit(vision_layers=4)
    images = torch.randn(4, 3, 32, 32)
    texts = fastclip.tokenize(["a photo", "a red square", "two cats", "x"], context_length=16)
    with torch.no_grad():
        image32, text32 = model.encode_image(images), model.encode_text(texts)
        half = convert_weights(model, torch.bfloat16)
        assert cosine(half.encode_image(images).float(), image32).min() > 0.999
        assert cosine(half.encode_text(texts).float(), text32).min() > 0.999


def test_torch_compile_traces_the_packed_path_without_graph_breaks():
    """Under torch.compile the packed products are ops of their own, which compiled graphs
    call: no graph break from fastclip's code, and the eager path's results."""
    if not cpu_linear.enabled():
        pytest.skip("no oneDNN (mkldnn) CPU ops in this PyTorch")
    model = small_vit()
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16))
    texts[:, -1] = 49407
    torch._dynamo.reset()
    with torch.no_grad():
        for encode, batch in ((model.encode_image, images), (model.encode_text, texts)):
            explained = torch._dynamo.explain(encode)(batch)
            assert explained.graph_break_count == 0, explained.break_reasons
            code = "".join(graph.code for graph in explained.graphs)
            for op in ("linear", "mlp", "layer_norm", "attention"):
                assert f"fastclip_cpu.{op}" in code, op
            compiled = torch.compile(encode, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(batch), encode(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["linear", "mlp"])
def test_the_compiled_paths_ops_pass_opcheck(op):
    if not cpu_linear.enabled():
        pytest.skip("no oneDNN (mkldnn) CPU ops in this PyTorch")
    x = torch.randn(2, 5, 16)
    if op == "linear":
        args = (x, torch.randn(24, 16), torch.randn(24))
    else:
        args = (x, torch.randn(64, 16), torch.randn(64), torch.randn(16, 64), torch.randn(16),
                "quick_gelu", torch.randn(2, 5, 16))
    torch.library.opcheck(getattr(torch.ops.fastclip_cpu, op), args)
