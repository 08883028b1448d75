"""The Triton kernels against their plain-PyTorch references.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
which ``conftest.py`` sets before any test module imports fastclip), on small shapes; on a GPU
the same tests run the compiled kernels. Accuracy follows flash-attention's rule: against an
fp32 reference computed from the same inputs, a kernel's error is at most twice the error of
PyTorch's own computation in the kernel's dtype, plus a small epsilon.
"""


import pytest
import torch
import torch.nn.functional as F

from fastclip import kernels
from fastclip.model import ResidualAttentionBlock, build_model_from_config, convert_weights
from fastclip.ops import reference, triton_backend
from fastclip.ops.dispatch import get_backend, triton_available

from numerics import cosine, worst_element
from small_models import clip_inputs, small_clip

CUDA = torch.cuda.is_available()

if not CUDA and not kernels.INTERPRETED:
    raise RuntimeError("fastclip.kernels was imported before TRITON_INTERPRET=1 was set, so its "
                       "kernels cannot run on the CPU; run pytest from the repository (its "
                       "conftest.py sets it) or with TRITON_INTERPRET=1.")

DEVICE = "cuda" if CUDA else "cpu"
# On a GPU every test here runs the compiled kernels, so `pytest -m gpu` selects them all;
# on the CPU they run in the interpreter, unmarked.
pytestmark = [pytest.mark.gpu] if CUDA else []
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The epsilon of the rule, relative to the output's magnitude: the rounding of one value.
EPSILON = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def assert_flash_rule(actual, expected, torch_actual, name):
    """max |actual - expected| <= 2 * max |torch_actual - expected| + epsilon, where
    ``expected`` is the fp32 reference and ``torch_actual`` PyTorch's result in actual's dtype."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == torch_actual.dtype, f"{name}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, expected.double().abs().max().item())
    torch_error = (torch_actual.double() - expected.double()).abs().max().item()
    bound = 2 * torch_error + EPSILON[actual.dtype] * scale
    if actual.dtype == torch.bfloat16 and kernels.INTERPRETED:
        bound += scale * 2.0 ** -7  # the interpreter truncates to bf16: up to one more unit
    index, got, want, error = worst_element(actual, expected)
    bad = ((actual.double() - expected.double()).abs() > bound).double().mean().item()
    assert error <= bound, (
        f"{name}: worst element at {index}: {got} vs fp32 reference {want} (error {error:.3e} "
        f"> bound {bound:.3e} = 2 x PyTorch's {actual.dtype} error {torch_error:.3e} + "
        f"epsilon); {bad:.2%} of elements out of tolerance")


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


# LayerNorm and the fused residual add.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 100), (2, 7, 300), (1, 77, 768), (3, 4096)])
def test_layer_norm(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3) + 1  # an offset mean, as residual streams have
    weight, bias = randn(shape[-1]), randn(shape[-1])  # fp32, as in OpenAI's fp16 models
    expected = reference.layer_norm(x.float(), weight, bias, 1e-5)
    actual = kernels.layer_norm(x, weight, bias, 1e-5)
    assert_flash_rule(actual, expected, reference.layer_norm(x, weight, bias, 1e-5), "layer_norm")


def test_layer_norm_non_contiguous_and_without_affine():
    stream = randn(2, 9, 200)
    for x in (stream[:, 0], stream[:, ::2], stream.transpose(0, 1)):
        expected = reference.layer_norm(x, None, None, 1e-6)
        assert_flash_rule(kernels.layer_norm(x, None, None, 1e-6), expected, expected,
                          "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 50, 300), (1, 77, 1000)])
def test_add_layer_norm(shape, dtype):
    x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    weight, bias = randn(shape[-1]), randn(shape[-1])
    total, normed = kernels.add_layer_norm(x, residual, weight, bias, 1e-5)
    torch_total, torch_normed = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert_sum_rounded_once(total, torch_total)
    expected = reference.layer_norm(total.float(), weight, bias, 1e-5)
    assert_flash_rule(normed, expected, torch_normed, "add_layer_norm")


def assert_sum_rounded_once(total, torch_total):
    """The sum is rounded once to the input dtype, exactly as PyTorch's add rounds it. The
    interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest), so there a
    bf16 sum may be one unit in the last place off."""
    if total.dtype == torch.bfloat16 and kernels.INTERPRETED:
        ulp = torch_total.float().abs() * 2.0 ** -7
        assert ((total.float() - torch_total.float()).abs() <= ulp).all(), (
            f"sum: worst {worst_element(total, torch_total)}")
    else:
        assert torch.equal(total, torch_total), f"sum: worst {worst_element(total, torch_total)}"


def test_add_layer_norm_non_contiguous():
    x, residual = randn(8, 5, 96).transpose(0, 1), randn(5, 8, 96)
    weight = randn(96)
    total, normed = kernels.add_layer_norm(x, residual, weight, None, 1e-5)
    expected_total, expected = reference.add_layer_norm(x, residual, weight, None, 1e-5)
    assert torch.equal(total, expected_total)
    assert_flash_rule(normed, expected, expected, "add_layer_norm")


# Attention on the packed QKV projection.

def check_attention(qkv, heads, causal):
    expected = reference.attention(qkv.float(), heads, causal)
    actual = kernels.attention(qkv, heads, causal)
    assert_flash_rule(actual, expected, reference.attention(qkv, heads, causal),
                      f"attention(L={qkv.shape[1]}, heads={heads}, causal={causal})")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 7, 50, 77, 257])
def test_attention_lengths(length, causal):
    check_attention(randn(1, length, 3 * 2 * 64, dtype=torch.float16), 2, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 80, 128])
def test_attention_head_dims(head_dim, dtype):
    for causal in (False, True):
        check_attention(randn(2, 77, 3 * 2 * head_dim, dtype=dtype, scale=2), 2, causal)


def test_attention_reads_strided_qkv():
    """A slice of a wider buffer (row stride > 3D) and every other sequence of a batch."""
    wide = randn(4, 50, 3 * 128 + 40, dtype=torch.float16)
    check_attention(wide[..., : 3 * 128], 2, causal=True)
    check_attention(wide[::2, :, 20: 20 + 3 * 128], 2, causal=False)


def test_attention_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        kernels.attention(randn(1, 7, 3 * 2 * 48), 2, False)
    with pytest.raises(ValueError, match="not 3 \\* heads \\* head_dim"):
        kernels.attention(randn(1, 7, 100), 3, False)
    with pytest.raises(ValueError, match="outside 1..1024"):
        kernels.attention(randn(1, 1025, 3 * 64), 1, False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        kernels.attention(randn(1, 7, 3 * 64).double(), 1, False)


# Linear layers with the epilogue fused.

def check_linear(x, weight, bias, activation, residual=None):
    def torch_linear(x, weight, bias, residual):
        out = F.linear(x, weight, bias)
        if activation != "none":
            out = reference.ACTIVATIONS[activation](out)
        return out if residual is None else out + residual

    def fp32(t):
        return None if t is None else t.float()

    expected = torch_linear(fp32(x), fp32(weight), fp32(bias), fp32(residual))
    actual = kernels.linear_act(x, weight, bias, activation, residual)
    assert_flash_rule(actual, expected, torch_linear(x, weight, bias, residual),
                      f"linear_act({activation})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "quick_gelu", "gelu"])
def test_linear_act(activation, dtype):
    weight, bias = randn(300, 200, dtype=dtype, scale=0.1), randn(300, dtype=dtype)
    for rows in (1, 7, 2 * 77):
        check_linear(randn(rows, 200, dtype=dtype), weight, bias, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_act_residual_strides_and_no_bias(dtype):
    stream = randn(3, 9, 160, dtype=dtype)
    weight = randn(96, 160, dtype=dtype, scale=0.1).t()  # (160, 96), a transposed view
    check_linear(stream[:, 1:, 32:128], weight, None, "quick_gelu", residual=stream[:, 1:])
    check_linear(stream[:, 0, :96], weight, randn(160, dtype=dtype), "none",
                 residual=randn(3, 160, dtype=dtype))
    check_linear(stream[:, 0, :96], weight, randn(320, dtype=dtype)[::2], "gelu")  # strided bias


def test_mlp_matches_reference():
    x = randn(2, 50, 128, dtype=torch.float16)
    fc_w, fc_b = randn(512, 128, dtype=torch.float16, scale=0.1), randn(512, dtype=torch.float16)
    proj_w = randn(128, 512, dtype=torch.float16, scale=0.05)
    proj_b = randn(128, dtype=torch.float16)
    args = (fc_w, fc_b, proj_w, proj_b, "quick_gelu")
    expected = reference.mlp(x.float(), *(a.float() if torch.is_tensor(a) else a for a in args))
    assert_flash_rule(kernels.mlp(x, *args), expected, reference.mlp(x, *args), "mlp")


def test_linear_act_refuses_bad_input():
    x, weight = randn(4, 32), randn(16, 32)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        kernels.linear_act(x, weight, None, "relu")
    with pytest.raises(ValueError, match="expected x \\(..., K\\) and weight \\(N, K\\)"):
        kernels.linear_act(x, weight.t(), None, "none")
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but the input"):
        kernels.linear_act(x, weight.half(), None, "none")
    with pytest.raises(ValueError, match="residual has shape"):
        kernels.linear_act(x, weight, None, "none", residual=randn(4, 32))


def test_layer_norm_refuses_bad_input():
    with pytest.raises(ValueError, match="must be 1 to 4096"):
        kernels.layer_norm(randn(2, 4097), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        kernels.layer_norm(randn(2, 64), randn(32), None, 1e-5)
    with pytest.raises(ValueError, match="residual has shape"):
        kernels.add_layer_norm(randn(2, 64), randn(1, 64), None, None, 1e-5)


# The backend and the whole model.

def test_backend_runs_only_where_the_kernels_can():
    backend = get_backend("triton", DEVICE)
    assert backend.name == "triton" and backend.attention is triton_backend.attention
    # "auto" picks the kernels on CUDA only, never in the interpreter.
    assert triton_available("cuda") == CUDA and not triton_available("cpu")
    with pytest.raises(ValueError, match="backend='triton'"):
        kernels.check_backend_device("cpu" if CUDA else "cuda")
    if CUDA:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            kernels.attention(torch.zeros(1, 2, 3 * 64), 1, False)


def test_small_clip_fp32_matches_reference():
    model = small_clip(vision_patch_size=32, vocab_size=1000).to(DEVICE)
    images, texts = clip_inputs(DEVICE)
    with torch.no_grad():
        expected = model.set_backend("reference").encode_image(images), model.encode_text(texts)
        actual = model.set_backend("triton").encode_image(images), model.encode_text(texts)
    assert model.backend == "triton"
    for name, got, want in zip(("image", "text"), actual, expected):
        assert_flash_rule(got, want, want, f"{name} features")


def test_training_through_the_kernels_gives_the_reference_gradients():
    """The kernels are forward-only; each op's backward is its reference's, recomputed."""
    model = build_model_from_config(
        "ViT-B/32", embed_dim=32, image_resolution=32, vision_patch_size=16, vision_layers=1,
        vision_width=64, transformer_layers=1, transformer_width=64, transformer_heads=2,
        vocab_size=1000).to(DEVICE)
    images, texts = torch.randn(2, 3, 32, 32, device=DEVICE), clip_inputs(DEVICE)[1]
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        logits_per_image, _ = model.set_backend(backend)(images, texts)
        logits_per_image.logsumexp(dim=1).sum().backward()
        grads[backend] = {name: p.grad.clone() for name, p in model.named_parameters()
                          if p.grad is not None}
    assert grads["triton"].keys() == grads["reference"].keys()
    for name, expected in grads["reference"].items():
        assert_flash_rule(grads["triton"][name], expected, expected, f"gradient of {name}")


def test_small_clip_fp16_stays_close_to_fp32():
    model = small_clip(vision_patch_size=32, vocab_size=1000).to(DEVICE)
    images, texts = clip_inputs(DEVICE)
    with torch.no_grad():
        expected = model.set_backend("reference").encode_image(images), model.encode_text(texts)
        convert_weights(model, torch.float16).set_backend("triton")
        actual = model.encode_image(images), model.encode_text(texts)
    for name, got, want in zip(("image", "text"), actual, expected):
        assert got.dtype == torch.float16
        similarity = cosine(got, want).min().item()
        assert similarity > 0.999, f"{name} features: cosine {similarity:.6f} to fp32"


def test_compiled_block_traces_without_graph_breaks():
    block = ResidualAttentionBlock(128, 2, causal=True).to(DEVICE).eval()
    x = randn(1, 7, 128)
    with torch.no_grad():
        expected = block(x)
        for module in block.modules():
            if "ops" in type(module).__dict__:
                module.ops = get_backend("triton", DEVICE)
        torch._dynamo.reset()
        # fullgraph=True raises on any graph break; aot_eager also runs the fake kernels.
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        actual = compiled(x)
    assert_flash_rule(actual, expected, expected, "compiled block")


@pytest.mark.parametrize("op, args", [
    ("layer_norm", lambda: (randn(3, 40), randn(40), None, 1e-5)),
    ("add_layer_norm", lambda: (randn(3, 40), randn(3, 40), randn(40), randn(40), 1e-5)),
    ("attention", lambda: (randn(1, 5, 3 * 64), 1, True)),
    ("linear_act", lambda: (randn(5, 24), randn(40, 24), randn(40), "quick_gelu", None)),
])
def test_registered_ops_pass_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.fastclip_triton, op).default, args(),
                          test_utils=("test_schema", "test_faketensor"))


# Shapes too large for the interpreter, and bf16 tensor-core dots, on a GPU only.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length, heads, head_dim", [(197, 12, 64), (577, 16, 64),
                                                     (1024, 8, 128), (257, 16, 80)])
def test_attention_full_size(length, heads, head_dim, dtype):
    for causal in (False, True):
        check_attention(randn(4, length, 3 * heads * head_dim, dtype=dtype), heads, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_and_layer_norm_full_size(dtype):
    x = randn(8, 257, 1024, dtype=dtype)
    weight, bias = randn(4096, 1024, dtype=dtype, scale=0.03), randn(4096, dtype=dtype)
    check_linear(x, weight, bias, "quick_gelu")
    hidden = randn(8, 257, 4096, dtype=dtype)
    ln_w, ln_b = randn(4096), randn(4096)
    assert_flash_rule(kernels.layer_norm(hidden, ln_w, ln_b, 1e-5),
                      reference.layer_norm(hidden.float(), ln_w, ln_b, 1e-5),
                      reference.layer_norm(hidden, ln_w, ln_b, 1e-5), "layer_norm")


@pytest.mark.gpu
def test_attention_batch_beyond_a_grid_axis_limit():
    """6000 sequences x 12 heads = 72000 programs per query block, more than CUDA's 65535
    limit on the second and third grid axes."""
    check_attention(randn(6000, 7, 3 * 12 * 64, dtype=torch.float16), 12, causal=True)
