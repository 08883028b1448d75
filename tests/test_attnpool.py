"""Attention pooling by the single-query algebra (``fastclip.ops.attention_pool``) against OpenAI's
formulation (``fastclip.ops.reference.attention_pool2d``): the compiled op ``fastclip._C`` on CPU
(and CUDA, marked ``gpu``) and the PyTorch fallback, at the five ResNets' pooling shapes."""

import functools
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastclip
from fastclip.ops import attention_pool, extension, reference
from fastclip.ops.attention_pool import attention_pool2d, attention_pool2d_single_query

from numerics import assert_close_relative, worst_element

# name: (C, H = W, heads, output_dim) of each ResNet's AttentionPool2d.
SHAPES = {
    "RN50": (2048, 7, 32, 1024),
    "RN101": (2048, 7, 32, 512),
    "RN50x4": (2560, 9, 40, 640),
    "RN50x16": (3072, 12, 48, 768),
    "RN50x64": (4096, 14, 64, 1024),
}

needs_op = pytest.mark.skipif(
    not extension.LOADED,
    reason=f"the compiled op is not available ({extension.ERROR})")
needs_cuda_op = pytest.mark.skipif(
    not attention_pool.extension_info()["cuda"],
    reason="fastclip._C has no CUDA kernels; build with FASTCLIP_CUDA=1 "
           "pip install --no-build-isolation -e .")


def op(*args):
    return torch.ops.fastclip.attention_pool2d(*args)


IMPLEMENTATIONS = {
    "op": pytest.param(op, marks=needs_op, id="op"),
    "algebra": pytest.param(attention_pool2d_single_query, id="algebra"),
}


def make_inputs(width, side, heads, output_dim, batch, dtype=torch.float32, device="cpu",
                seed=0, height=None):
    """Arguments of attention_pool2d with the statistics of a ResNet's last stage (ReLU
    outputs) and of CLIP's initialization (weights of std C^-1/2)."""
    generator = torch.Generator().manual_seed(seed)
    height = height or side

    def normal(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(device, dtype)

    x = torch.randn(batch, width, height, side, generator=generator).relu().to(device, dtype)
    return (x, normal(height * side + 1, width, std=width ** -0.5),
            normal(width, width, std=width ** -0.5), normal(width, std=0.1),
            normal(width, width, std=width ** -0.5), normal(width, std=0.1),
            normal(width, width, std=width ** -0.5), normal(width, std=0.1),
            normal(output_dim, width, std=width ** -0.5), normal(output_dim, std=0.1), heads)


@functools.lru_cache(maxsize=2)
def openai_fp32(name, batch):
    """Inputs and OpenAI's fp32 result, computed once for the implementations compared to it."""
    args = make_inputs(*SHAPES[name], batch)
    return args, reference.attention_pool2d(*args)


# The shape varies slowest, so the cached reference serves every implementation in turn.
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", SHAPES)
def test_fp32_matches_openai(name, batch, implementation):
    args, expected = openai_fp32(name, batch)
    assert_close_relative(implementation(*args), expected, 1e-5, name=f"{name} batch {batch}")


def assert_low_precision_close(actual, reference_low, truth, name):
    """flash-attention's rule: the error against an exact result is at most twice that of
    OpenAI's formulation computed in the same low precision (plus a few fp32 ulps of the
    output's magnitude, for outputs the low-precision reference happens to get right)."""
    scale = truth.abs().max().item()
    error = (actual.double() - truth).abs().max().item()
    allowed = 2 * (reference_low.double() - truth).abs().max().item() + 1e-6 * scale
    index, got, want, _ = worst_element(actual, truth)
    assert error <= allowed, (
        f"{name}: worst element at {index}: {got} vs exact {want} (error {error:.3e} > "
        f"{allowed:.3e}, twice the error of OpenAI's formulation in {actual.dtype})")


@functools.lru_cache(maxsize=1)
def openai_low_precision(name, dtype):
    """Inputs in ``dtype``, OpenAI's result in ``dtype`` and its exact (float64) result."""
    args = make_inputs(*SHAPES[name], batch=2, dtype=dtype)
    # OpenAI's fp16 models keep the positional embedding in fp32, as convert_weights does.
    args = (args[0], args[1].float()) + args[2:]
    exact = reference.attention_pool2d(*(a.double() if torch.is_tensor(a) else a for a in args))
    return args, reference.attention_pool2d(*args), exact


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", SHAPES)
def test_low_precision_within_twice_openai_error(name, dtype, implementation):
    if dtype == torch.float16 and name in ("RN50x16", "RN50x64"):
        pytest.skip("fp16 matmuls are slow on CPU; RN50, RN101 and RN50x4 cover fp16 here "
                    "(every shape runs in fp16 in the gpu tests)")
    args, openai_low, exact = openai_low_precision(name, dtype)
    assert_low_precision_close(implementation(*args), openai_low, exact, f"{name} {dtype}")


def strided_variants(args):
    """The same values as channels_last, as a strided slice of a larger map, and with
    non-contiguous weights (transposed) and biases (every other element of a larger one)."""
    x, positions, *parameters, heads = args
    wide = x.new_zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
    wide[..., ::2] = x
    strided = [p.t().contiguous().t() if p.dim() == 2 else torch.stack([p, p], dim=1)[:, 0]
               for p in parameters]
    return {
        "channels_last": (x.contiguous(memory_format=torch.channels_last), positions,
                          *parameters, heads),
        "strided": (wide[..., ::2], positions, *parameters, heads),
        "parameters_strided": (x, positions, *strided, heads),
    }


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
def test_layouts_give_the_same_result(implementation):
    args = make_inputs(*SHAPES["RN50x4"], batch=2)
    expected = reference.attention_pool2d(*args)
    for layout, variant in strided_variants(args).items():
        assert_close_relative(implementation(*variant), expected, 1e-5, name=layout)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_gradcheck_float64(implementation, memory_format):
    # Non-square map (H=3, W=2), several heads, output_dim != C.
    args = list(make_inputs(8, 2, 2, 6, batch=2, dtype=torch.float64, height=3))
    args[0] = args[0].contiguous(memory_format=memory_format)
    args = [a.requires_grad_() if torch.is_tensor(a) else a for a in args]
    # fast_mode checks random projections of the Jacobian: the same failures, far fewer calls.
    assert torch.autograd.gradcheck(implementation, args, fast_mode=True)


def test_backward_matches_openai():
    """The op's registered backward gives OpenAI's gradients for every parameter (k_bias's,
    which the softmax cancels, is zero), at a realistic shape. In float64, to within the
    reference's own accuracy: its softmax runs in fp32."""
    args = make_inputs(256, 7, 4, 128, batch=3, dtype=torch.float64)
    grad_output = torch.randn(3, 128, dtype=torch.float64)
    names = ("x", "positional_embedding") + attention_pool.PARAMETER_NAMES

    def gradients(function):
        inputs = [a.clone().requires_grad_() if torch.is_tensor(a) else a for a in args]
        function(*inputs).backward(grad_output)
        return [a.grad if a.grad is not None else torch.zeros_like(a) for a in inputs[:-1]]

    expected = dict(zip(names, gradients(reference.attention_pool2d)))
    tested = op if extension.LOADED else attention_pool2d_single_query
    actual = dict(zip(names, gradients(tested)))
    # k_bias: exactly zero here; OpenAI's is zero up to its rounding.
    assert actual.pop("k_bias").abs().max() == 0
    assert expected.pop("k_bias").abs().max() <= 1e-6 * expected["q_bias"].abs().max()
    for name, want in expected.items():
        assert_close_relative(actual[name], want, 1e-6, name=f"gradient of {name}")


@needs_op
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_opcheck(requires_grad):
    args = make_inputs(8, 3, 2, 6, batch=2)
    args = [a.requires_grad_(requires_grad) if torch.is_tensor(a) else a for a in args]
    torch.library.opcheck(torch.ops.fastclip.attention_pool2d, args)


def test_attention_pool2d_uses_the_op_where_built_and_accepts_missing_biases():
    args = make_inputs(64, 3, 4, 32, batch=2)
    without_biases = args[:3] + (None, args[4], None, args[6], None, args[8], None, 4)
    assert_close_relative(attention_pool2d(*without_biases),
                          reference.attention_pool2d(*without_biases), 1e-5)
    info = attention_pool.extension_info()
    assert ("compiled op" in info["attention_pool2d"]) == info["built"]
    # Which path actually runs: the compiled op shows up in the dispatcher where it is built.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        attention_pool2d(*args)
    used_op = any("fastclip.attention_pool2d" in name for name in recorder.ops)
    assert used_op == info["cpu"], (info, sorted(set(recorder.ops))[:10])


def test_built_extension_loads():
    """A fastclip._C that is built but does not load would silently leave only the fallback."""
    built = glob.glob(os.path.join(os.path.dirname(fastclip.__file__), "_C*.so"))
    if not built:
        pytest.skip("fastclip._C is not built (pip install --no-build-isolation -e . builds it)")
    assert extension.LOADED, extension.ERROR
    assert attention_pool.extension_info()["cpu"]


def test_fastclip_works_without_the_extension():
    """With fastclip._C missing, fastclip imports, says so, and pools by the PyTorch algebra."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class HideExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fastclip._C":
                    raise ModuleNotFoundError("No module named 'fastclip._C'", name=name)

        sys.meta_path.insert(0, HideExtension())
        import torch, fastclip
        from fastclip.ops import attention_pool, reference
        info = attention_pool.extension_info()
        assert not info["built"] and "not built" in info["error"], info
        assert not attention_pool.OP_DEVICES, attention_pool.OP_DEVICES
        x, pos = torch.rand(2, 8, 3, 3), torch.randn(10, 8)
        weights = [torch.randn(8, 8), torch.randn(8)] * 3 + [torch.randn(4, 8), torch.randn(4)]
        got = attention_pool.attention_pool2d(x, pos, *weights, 2)
        torch.testing.assert_close(got, reference.attention_pool2d(x, pos, *weights, 2))
        print("fallback ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-2000:]


def test_pool_shapes_are_the_configs():
    for name, (width, side, heads, output_dim) in SHAPES.items():
        config = fastclip.CONFIGS[name]
        assert (width, side, heads, output_dim) == (
            config["vision_width"] * 32, config["image_resolution"] // 32,
            config["vision_width"] * 32 // 64, config["embed_dim"]), name


BAD_INPUTS = {
    "positional_embedding": lambda a: (a[0], a[1][:-1]) + a[2:],
    "heads": lambda a: a[:-1] + (5,),
    "dtype": lambda a: a[:2] + (a[2].double(),) + a[3:],
    "c_bias": lambda a: a[:-2] + (a[-2][:-1], a[-1]),
    "x must be": lambda a: (a[0][0],) + a[1:],
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(problem):
    args = BAD_INPUTS[problem](make_inputs(64, 3, 4, 32, batch=2))
    with pytest.raises(ValueError, match=problem):
        attention_pool2d(*args)
    if extension.LOADED:
        with pytest.raises(RuntimeError, match=problem):
            op(*args)


def test_resnet_model_torch_backend_matches_reference():
    """A whole (reduced) RN50 image tower: backend "torch" pools by the single-query algebra,
    backend "reference" by OpenAI's formulation."""
    model = fastclip.build_model_from_config("RN50", vision_layers=(1, 1, 1, 1),
                                             transformer_layers=1).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.set_backend("reference").encode_image(images)
        pooled_by = model.set_backend("torch").visual.attnpool.ops.attention_pool2d
        actual = model.encode_image(images)
    assert pooled_by is attention_pool2d, "the torch backend does not use attention_pool2d"
    assert_close_relative(actual, expected, 1e-5, name="RN50 image features")


# On a CUDA device: the CUDA kernels against OpenAI's formulation.

@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", SHAPES)
def test_cuda_matches_openai(name, dtype):
    args = make_inputs(*SHAPES[name], batch=4, dtype=dtype, device="cuda")
    args = (args[0], args[1].float()) + args[2:]
    truth = reference.attention_pool2d(*(a.double() if torch.is_tensor(a) else a for a in args))
    actual = op(*args)
    if dtype == torch.float32:
        assert_close_relative(actual.double(), truth, 1e-5, name=name)
    else:
        assert_low_precision_close(actual, reference.attention_pool2d(*args), truth,
                                   f"{name} {dtype}")


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_layouts_and_odd_sizes():
    # C = 80 is not a multiple of the kernel's 32-channel tiles; 5x3 positions not of 32.
    for shape, height in ((SHAPES["RN50x16"], None), ((80, 3, 5, 48), 5)):
        args = make_inputs(*shape, batch=3, device="cuda", height=height)
        expected = reference.attention_pool2d(*args)
        assert_close_relative(op(*args), expected, 1e-5, name=f"{shape} contiguous")
        for layout, variant in strided_variants(args).items():
            assert_close_relative(op(*variant), expected, 1e-5, name=f"{shape} {layout}")


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_gradcheck_and_opcheck():
    args = make_inputs(8, 2, 2, 6, batch=2, dtype=torch.float64, device="cuda", height=3)
    args = [a.requires_grad_() if torch.is_tensor(a) else a for a in args]
    assert torch.autograd.gradcheck(op, args, fast_mode=True)
    torch.library.opcheck(torch.ops.fastclip.attention_pool2d,
                          make_inputs(8, 3, 2, 6, batch=2, device="cuda"))
