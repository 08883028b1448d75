"""What every Triton kernel wrapper in ``fastclip.kernels`` checks before it launches.

Nothing here touches ``torch.cuda`` at import time, so the kernels import on a machine
without a GPU. ``TRITON_INTERPRET`` is read when the kernels are defined (Triton decides
then whether ``@triton.jit`` compiles or interprets), so it must be set before
``fastclip.kernels`` is first imported.
"""

import contextlib
import os

import torch

# Whether this process's kernels run in Triton's interpreter (numpy, on CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(op, *tensors):
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    wanted = "cpu" if INTERPRETED else "cuda"
    for tensor in tensors:
        if tensor is not None and tensor.device.type != wanted:
            if INTERPRETED:
                raise ValueError(
                    f"fastclip Triton op {op}: TRITON_INTERPRET=1 runs kernels on CPU tensors, "
                    f"but got a tensor on {tensor.device}. Unset TRITON_INTERPRET to run the "
                    "compiled kernels on CUDA.")
            raise ValueError(
                f"fastclip Triton op {op}: the Triton backend needs CUDA tensors, but got a "
                f"tensor on {tensor.device}. Move the model and inputs to a CUDA device, use "
                "backend='torch' on the CPU, or set TRITON_INTERPRET=1 before importing "
                "fastclip to test the kernels on the CPU.")


def check_dtype(op, name, tensor, dtype=None):
    """``tensor`` is fp16, bf16 or fp32, and ``dtype`` when given."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fastclip Triton op {op}: {name} has dtype {tensor.dtype}; "
                        "use float16, bfloat16 or float32.")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"fastclip Triton op {op}: {name} has dtype {tensor.dtype} but the "
                        f"input has {dtype}; convert them to one dtype.")


def refusal(check, *args):
    """Why the kernel that ``check`` guards cannot compute ``args`` (its error message), or
    None when it can: the same rules as the op's own, without raising."""
    try:
        check(*args)
    except (ValueError, TypeError, IndexError) as error:
        return str(error)
    return None


def on_device_of(tensor):
    """Launch on the tensor's GPU, not the current one: a model on cuda:1 while cuda:0 is
    current must not run device-1 pointers in device 0's context."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def rows(x):
    """``x`` as a 2-D ``(rows, width)`` view with unit column stride, copying only if needed."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def matmul_uses_tf32():
    """Whether PyTorch's own fp32 CUDA matmuls use TF32, however it was set: the newer
    ``fp32_precision`` settings (the matmul's own, or the global one it defers to with
    ``"none"``) or the legacy ``allow_tf32`` flag, which raises once the newer ones are used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype):
    """``tl.dot``'s ``input_precision`` for ``dtype``: fp32 inputs use TF32 only where
    PyTorch's own matmuls would (:func:`matmul_uses_tf32`), so the kernels give the answers
    PyTorch gives. The interpreter computes fp32 dots exactly either way."""
    if dtype == torch.float32 and not matmul_uses_tf32():
        return "ieee"
    return "tf32"


def upcast_dot(dtype):
    """The interpreter's bf16 ``tl.dot`` is wrong (triton-lang/triton#11584): there the
    kernels convert bf16 operands to fp32 before the dot, which is exact for bf16 values."""
    return INTERPRETED and dtype == torch.bfloat16
