"""The kernels compile for real GPUs, checked on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every
interpreter test and still fail to compile (a type that changes across a loop, a block too
large for shared memory). This compiles representative launch configurations, exactly as
the wrappers choose them, to PTX and cubin for Hopper (sm_90) and Ampere (sm_80), and checks
their shared memory fits. It runs in a subprocess because the test process may have set
TRITON_INTERPRET=1, under which kernels cannot be compiled. On a GPU machine the kernels
themselves run instead, so it skips there.
"""

import os
import subprocess
import sys

import pytest
import torch

# Shared memory per block on each target, in bytes.
SHARED_MEMORY = {90: 232448, 80: 166912}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run on this GPU instead")
def test_kernels_compile_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def signature(fn, pointers, floats=(), ones=()):
    """Triton's signature and attributes for ``fn``, as its launcher specializes a call:
    ``pointers`` maps pointer arguments to their element type (PyTorch's allocations are
    16-byte aligned), ``floats`` names the fp32 scalars, ``ones`` the integers equal to 1
    (a unit stride, which Triton compiles as a constant); strides and the matmul's sizes
    are multiples of 16 at CLIP's widths, as the launcher then tells the compiler; the other
    arguments are int32 or constexpr."""
    types, attrs, constants = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in ones:
            types[name] = "constexpr"
            if name in ones:
                constants[name] = 1
        elif name in pointers:
            types[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            types[name] = "fp32" if name in floats else "i32"
            if name.startswith("stride") or name in ("M", "N", "K"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return types, attrs, constants


def compile_kernel(fn, spec, options, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types, attrs, constants = spec
    options = dict(options)
    launch = {k: options.pop(k) for k in ("num_warps", "num_stages") if k in options}
    source = ASTSource(fn=fn, signature=types, constexprs={**options, **constants}, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=launch)
    shared = kernel.metadata.shared
    assert shared <= SHARED_MEMORY[capability], (
        f"{fn.__name__} {options} {launch}: {shared} bytes of shared memory on sm_{capability}, "
        f"more than {SHARED_MEMORY[capability]}")
    print(f"sm_{capability} {fn.__name__} {options} {launch}: {shared} bytes shared")


def compile_all():
    attention = sys.modules["fastclip.kernels.attention"]
    layer_norm = sys.modules["fastclip.kernels.layer_norm"]
    linear = sys.modules["fastclip.kernels.linear"]
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

    def tensors(names_, dtype):
        return {name: f"*{names[dtype]}" for name in names_}

    for dtype, capability in ((torch.float16, 90),):
        types = signature(layer_norm._layer_norm_kernel,
                          {**tensors(("X", "RESIDUAL", "SUM", "Y"), dtype),
                           "W": "*fp32", "B": "*fp32"}, floats=("eps",))
        compile_kernel(layer_norm._layer_norm_kernel, types,
                       layer_norm.launch_options(768, True, True, True), capability)

    for dtype, length, head_dim, causal, capability in (
            (torch.float16, 77, 64, True, 90), (torch.bfloat16, 1024, 80, False, 90),
            (torch.float32, 257, 128, False, 80)):
        types = signature(attention._attention_kernel, tensors(("QKV", "OUT"), dtype),
                          floats=("scale_log2",))
        compile_kernel(attention._attention_kernel, types,
                       attention.launch_options(length, head_dim, dtype, causal), capability)

    for dtype, rows, activation, capability in (
            (torch.float16, 12800, "quick_gelu", 90), (torch.bfloat16, 8, "gelu", 90),
            (torch.float32, 300, "none", 80)):
        types = signature(linear._linear_act_kernel,
                          tensors(("X", "W", "BIAS", "RESIDUAL", "OUT"), dtype),
                          ones=("stride_wk",))
        compile_kernel(linear._linear_act_kernel, types,
                       linear.launch_options(rows, dtype, activation, True, True), capability)


if __name__ == "__main__":
    import fastclip.kernels  # noqa: F401  (registers the modules compiled above)

    compile_all()
