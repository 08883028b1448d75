"""The ``torch`` backend's ops: PyTorch's own kernels, and on the CPU oneDNN products on
prepacked weights (``cpu_linear``). Each has the signature and the result of its namesake in
``reference``, up to rounding.

Under ``torch.compile`` on the CPU, without autograd, LayerNorm and attention are ops of their
own (``fastclip_cpu::layer_norm``, ``fastclip_cpu::attention``), as the packed products are:
the compiler then calls PyTorch's kernels for them rather than generating its own, which are
slower there."""


import torch
import torch.nn.functional as F

from . import cpu_linear, reference
from .cpu_linear import QUICK_GELU_SCALE


def _compiled_on_cpu(*tensors):
    """Whether this call is being compiled, on CPU tensors that need no gradient."""
    if not torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False  # under autocast, PyTorch's ops cast their inputs: leave them to it
    grad = torch.is_grad_enabled()
    return all(t is None or (t.device.type == "cpu" and not (grad and t.requires_grad))
               for t in tensors)


def layer_norm(x, weight, bias, eps):
    """``reference.layer_norm`` without its fp32 copy of the input: PyTorch's kernels compute
    in fp32 for bf16 and fp16 inputs and round once, so the copy only costs passes."""
    if _compiled_on_cpu(x, weight, bias):
        return _layer_norm_op(x, weight, bias, eps)
    return _layer_norm(x, weight, bias, eps)


def _layer_norm(x, weight, bias, eps):
    if x.device.type != "cpu":
        if _autocast(x.device.type) or _needs_grad(weight, bias):
            # Autocast computes LayerNorm in fp32 anyway, and the weights' gradients must not
            # pass through the input's dtype: the reference's fp32 copy.
            return reference.layer_norm(x, weight, bias, eps)
        return _layer_norm_one_dtype(x, weight, bias, eps)
    # The CPU kernel takes bf16/fp16 inputs with fp32 weights.
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _autocast(device_type):
    return (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _layer_norm_one_dtype(x, weight, bias, eps):
    """LayerNorm in one pass for kernels that want the weights in the input's dtype (CUDA's):
    the weights (fp32 in OpenAI's half-precision layout) are rounded to it, which is as much
    error as the output's own rounding. For inference: with autograd on the weights or under
    autocast, ``_layer_norm`` takes the reference. Under autocast anyway, the result is cast
    back to the input's dtype as the reference's is."""
    weight = weight.to(x.dtype) if weight is not None else None
    bias = bias.to(x.dtype) if bias is not None else None
    out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def add_layer_norm(x, residual, weight, bias, eps):
    total = x + residual
    return total, layer_norm(total, weight, bias, eps)


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """``reference.mlp``. On the CPU without a gradient: oneDNN on packed weights with the
    activation and the residual add fused into the products (``cpu_linear``). Elsewhere
    QuickGELU costs one pass over the hidden layer, the block's largest tensor
    (:func:`_quick_gelu_mlp`)."""
    out = cpu_linear.mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    if out is not None:
        return out
    if activation == "quick_gelu":
        out = _quick_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias)
    else:
        out = F.linear(reference.ACTIVATIONS[activation](F.linear(x, fc_weight, fc_bias)),
                       proj_weight, proj_bias)
    return out if residual is None else residual + out


def _quick_gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """``Linear -> QuickGELU -> Linear`` with one elementwise pass. QuickGELU(h) =
    h * sigmoid(1.702 h) = silu(1.702 h) / 1.702, so the first product's epilogue computes
    1.702 h (addmm's ``alpha``, and the bias scaled), SiLU runs in place (one kernel, where
    ``x * sigmoid(1.702 x)`` takes three), and the second product's ``alpha`` divides by
    1.702. The biases stay vectors, so cuBLASLt still adds them in its epilogue."""
    rows = x.reshape(-1, x.shape[-1])
    if fc_bias is not None:
        hidden = torch.addmm(fc_bias * QUICK_GELU_SCALE, rows, fc_weight.t(),
                             alpha=QUICK_GELU_SCALE)
    else:
        hidden = torch.mm(rows, fc_weight.t()).mul_(QUICK_GELU_SCALE)
    hidden = F.silu(hidden, inplace=not (torch.is_grad_enabled() and hidden.requires_grad))
    if proj_bias is not None:
        out = torch.addmm(proj_bias, hidden, proj_weight.t(), alpha=1 / QUICK_GELU_SCALE)
    else:
        out = torch.mm(hidden, proj_weight.t()).div_(QUICK_GELU_SCALE)
    return out.view(*x.shape[:-1], out.shape[-1])


def attention(qkv, heads, causal):
    """``reference.attention`` through ``F.scaled_dot_product_attention``."""
    if _compiled_on_cpu(qkv):
        return _attention_op(qkv, heads, causal)
    return _attention(qkv, heads, causal)


def _attention(qkv, heads, causal):
    q, k, v = reference.split_heads(qkv, heads)
    return reference.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=causal))


linear = cpu_linear.linear


def patch_embed(x, weight):
    """``reference.patch_embed``; on the CPU without a gradient, one oneDNN product on the
    packed weight (``cpu_linear.patch_embed``)."""
    out = cpu_linear.patch_embed(x, weight)
    return out if out is not None else reference.patch_embed(x, weight)


@cpu_linear.cpu_op("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
                   lambda x, weight, bias, eps:
                   torch.empty_like(x, memory_format=torch.contiguous_format))
def _layer_norm_op(x, weight, bias, eps):
    return _layer_norm(x, weight, bias, eps)


@cpu_linear.cpu_op("attention(Tensor qkv, int heads, bool causal) -> Tensor",
                   lambda qkv, heads, causal:
                   qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3))
def _attention_op(qkv, heads, causal):
    return _attention(qkv, heads, causal).contiguous()
