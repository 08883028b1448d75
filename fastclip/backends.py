"""The one place that decides which implementation computes each operation.

The model's blocks call ``self.ops.linear(...)``, ``self.ops.layer_norm(...)``,
``self.ops.attention(...)``, ``self.ops.mlp(...)`` and ``self.ops.attention_pool2d(...)``;
``self.ops`` is a :class:`Backend`, set on every block by ``CLIP.set_backend``. The model
never branches on backends itself.

Backends:

- ``reference``: OpenAI's math in plain PyTorch (``fastclip.reference``), what every kernel
  is tested against.
- ``torch``: the fastest path that needs no Triton: ``F.scaled_dot_product_attention``,
  PyTorch ops, and on the CPU oneDNN products on prepacked weights with the MLP's activation
  and residual add fused in (``fastclip.cpu_linear``).
- ``triton``: fused Triton kernels (``fastclip.kernels``); needs a CUDA device, or
  ``TRITON_INTERPRET=1`` to run on CPU tensors for testing.
- ``auto``: ``triton`` on a CUDA device when Triton imports, else ``torch``.

The environment variable ``FASTCLIP_BACKEND`` has the same meaning as ``load(backend=...)``
and is read when the argument is ``"auto"``.
"""

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import attention_pool, cpu_linear, reference

BACKEND_NAMES = ("auto", "triton", "torch", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable
    layer_norm: Callable
    add_layer_norm: Callable
    attention: Callable
    mlp: Callable
    attention_pool2d: Callable

    def __repr__(self):
        return f"Backend({self.name!r})"


def _layer_norm(x, weight, bias, eps):
    """``reference.layer_norm`` without its fp32 copy of a CPU input: PyTorch's CPU kernel
    takes bf16/fp16 inputs with fp32 weights and computes in fp32 (CUDA's kernel wants one
    dtype for both, so CUDA tensors take the reference)."""
    if x.device.type != "cpu":
        return reference.layer_norm(x, weight, bias, eps)
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _add_layer_norm(x, residual, weight, bias, eps):
    total = x + residual
    return total, _layer_norm(total, weight, bias, eps)


def _mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """``reference.mlp``. On the CPU without a gradient: oneDNN on packed weights with the
    activation and the residual add fused into the products (``fastclip.cpu_linear``).
    Elsewhere QuickGELU is computed in place when no gradient is recorded: the hidden layer is
    the block's largest tensor, and each buffer fewer is a pass fewer."""
    out = cpu_linear.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    if out is not None:
        return out
    hidden = F.linear(x, fc_weight, fc_bias)
    if activation == "quick_gelu" and not (torch.is_grad_enabled() and hidden.requires_grad):
        hidden = hidden.mul_(torch.sigmoid_(hidden * 1.702))
    else:
        hidden = reference.ACTIVATIONS[activation](hidden)
    out = F.linear(hidden, proj_weight, proj_bias)
    return out if residual is None else residual + out


def _sdpa_attention(qkv, heads, causal):
    q, k, v = reference.split_heads(qkv, heads)
    return reference.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


REFERENCE = Backend(
    name="reference",
    linear=F.linear,
    layer_norm=reference.layer_norm,
    add_layer_norm=reference.add_layer_norm,
    attention=reference.attention,
    mlp=reference.mlp,
    attention_pool2d=reference.attention_pool2d,
)

TORCH = Backend(
    name="torch",
    linear=cpu_linear.linear,
    layer_norm=_layer_norm,
    add_layer_norm=_add_layer_norm,
    attention=_sdpa_attention,
    mlp=_mlp,
    attention_pool2d=attention_pool.attention_pool2d,
)


def _triton_backend(device=None):
    """Build the Triton backend, or raise a clear error saying why it cannot run here.

    The kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
    before fastclip's kernels were first imported (Triton's interpreter, for testing).
    """
    try:
        from . import kernels
    except ImportError as error:
        raise RuntimeError(
            f"backend='triton' needs the triton package, which did not import ({error}). "
            "Install triton, or use backend='torch'.") from error
    if device is not None:
        kernels.check_backend_device(device)
    return Backend(
        name="triton",
        linear=F.linear,
        layer_norm=kernels.layer_norm,
        add_layer_norm=kernels.add_layer_norm,
        attention=kernels.attention,
        mlp=kernels.mlp,
        attention_pool2d=attention_pool.attention_pool2d,
    )


def triton_available(device):
    """Whether the Triton backend can run on ``device``."""
    if torch.device(device).type != "cuda":
        return False
    try:
        _triton_backend(device)
    except (ImportError, RuntimeError, ValueError):
        return False
    return True


def get_backend(name="auto", device="cpu"):
    """Resolve a backend name (or ``"auto"``) for ``device`` into a :class:`Backend`."""
    if isinstance(name, Backend):
        return name
    if name == "auto":
        name = os.environ.get("FASTCLIP_BACKEND", "auto") or "auto"
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"Unknown backend {name!r} (from the argument or FASTCLIP_BACKEND); "
            f"choose one of {', '.join(BACKEND_NAMES)}."
        )
    if name == "auto":
        name = "triton" if triton_available(device) else "torch"
    if name == "reference":
        return REFERENCE
    if name == "torch":
        return TORCH
    return _triton_backend(device)
