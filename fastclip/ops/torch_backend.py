"""The ``torch`` backend's ops: PyTorch's own kernels, and on the CPU oneDNN products on
prepacked weights (``cpu_linear``). Each has the signature and the result of its namesake in
``reference``, up to rounding.

Under ``torch.compile`` on the CPU, without autograd, LayerNorm and attention are ops of their
own (``fastclip_cpu::layer_norm``, ``fastclip_cpu::attention``), as the packed products are:
the compiler then calls PyTorch's kernels for them rather than generating its own, which are
slower there."""


from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_linear, reference


def _compiled_on_cpu(*tensors):
    """Whether this call is being compiled, on CPU tensors that need no gradient."""
    if not torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False  # under autocast, PyTorch's ops cast their inputs: leave them to it
    grad = torch.is_grad_enabled()
    return all(t is None or (t.device.type == "cpu" and not (grad and t.requires_grad))
               for t in tensors)


def layer_norm(x, weight, bias, eps):
    """``reference.layer_norm`` without its fp32 copy of a CPU input: PyTorch's CPU kernel
    takes bf16/fp16 inputs with fp32 weights and computes in fp32 (CUDA's kernel wants one
    dtype for both, so CUDA tensors take the reference)."""
    if _compiled_on_cpu(x, weight, bias):
        return _layer_norm_op(x, weight, bias, eps)
    return _layer_norm(x, weight, bias, eps)


def _layer_norm(x, weight, bias, eps):
    if x.device.type != "cpu":
        return reference.layer_norm(x, weight, bias, eps)
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    total = x + residual
    return total, layer_norm(total, weight, bias, eps)


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """``reference.mlp``. On the CPU without a gradient: oneDNN on packed weights with the
    activation and the residual add fused into the products (``cpu_linear``). Elsewhere
    QuickGELU is computed in place when no gradient is recorded: the hidden layer is the
    block's largest tensor, and each buffer fewer is a pass fewer."""
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


def attention(qkv, heads, causal):
    """``reference.attention`` through ``F.scaled_dot_product_attention``."""
    if _compiled_on_cpu(qkv):
        return _attention_op(qkv, heads, causal)
    return _attention(qkv, heads, causal)


def _attention(qkv, heads, causal):
    q, k, v = reference.split_heads(qkv, heads)
    return reference.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


linear = cpu_linear.linear


@torch.library.custom_op("fastclip_cpu::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _layer_norm(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastclip_cpu::attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    return _attention(qkv, heads, causal).contiguous()


@_attention_op.register_fake
def _(qkv, heads, causal):
    n, length, three_width = qkv.shape
    return qkv.new_empty(n, length, three_width // 3)
