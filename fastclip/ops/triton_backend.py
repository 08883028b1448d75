"""The ``triton`` backend's ops: each runs its Triton kernel (``fastclip.kernels``) where the
kernel can compute the call, and the ``torch`` backend's op where it cannot, so the rest of
the model keeps its kernels. What falls back, and why, is counted (:func:`fallbacks`).

A kernel cannot compute a call for shapes outside its range (head dims other than 32, 64,
80 and 128, sequences over 1,024 tokens, widths over 4,096) or for inputs of mixed dtypes,
which autocast makes (an fp32 weight beside a bf16 activation): PyTorch's op autocasts them.
"""

import collections
import threading

import torch

from .. import kernels
from . import (
    torch_backend,
    triton_autograd,  # noqa: F401  (registers the kernels' backward passes)
)

_FALLBACKS = collections.Counter()
_LOCK = threading.Lock()


MAX_REASONS = 100  # distinct reasons kept; shapes vary, the count must not grow without end


def _fell_back(op, reason):
    if torch.compiler.is_compiling():
        return  # counted in eager mode only: a lock cannot be traced
    with _LOCK:
        if (op, reason) not in _FALLBACKS and len(_FALLBACKS) >= MAX_REASONS:
            reason = "other reasons"
        _FALLBACKS[(op, reason)] += 1


def fallbacks():
    """``{"op: reason": calls}`` of the calls that ran the torch op instead of the kernel,
    in this process."""
    with _LOCK:
        return {f"{op}: {reason}": calls for (op, reason), calls in _FALLBACKS.items()}


def clear_fallbacks():
    with _LOCK:
        _FALLBACKS.clear()


def layer_norm(x, weight, bias, eps):
    reason = kernels.layer_norm_refusal(x, None, weight, bias)
    if reason is None:
        return kernels.layer_norm(x, weight, bias, eps)
    _fell_back("layer_norm", reason)
    return torch_backend.layer_norm(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    reason = kernels.layer_norm_refusal(x, residual, weight, bias)
    if reason is None:
        return kernels.add_layer_norm(x, residual, weight, bias, eps)
    _fell_back("add_layer_norm", reason)
    return torch_backend.add_layer_norm(x, residual, weight, bias, eps)


def attention(qkv, heads, causal):
    reason = kernels.attention_refusal(qkv, heads)
    if reason is None:
        return kernels.attention(qkv, heads, causal)
    _fell_back("attention", reason)
    return torch_backend.attention(qkv, heads, causal)


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    reason = kernels.linear_act_refusal(x, fc_weight, fc_bias, activation)
    if reason is None:
        return kernels.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    _fell_back("mlp", reason)
    return torch_backend.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation,
                             residual)
