"""Plain-PyTorch reference implementations of the operations CLIP's blocks are made of.

These are OpenAI's formulas, written for reading. The ``reference`` backend runs them, every
fused kernel (Triton in ``fastclip.kernels``, C++/CUDA in ``fastclip._C``) is tested against
them, and the Triton kernels' backward passes differentiate them (``triton_autograd``).

Layouts: token sequences are batch-first, ``(N, L, D)``.
"""

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias, eps):
    """LayerNorm computed in fp32 and cast back to the input's dtype, as OpenAI's LayerNorm does."""
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(x.dtype)


def add_layer_norm(x, residual, weight, bias, eps):
    """``(x + residual, layer_norm(x + residual))``: a block's residual add and the LayerNorm
    that follows it, which the fused kernels compute in one pass."""
    total = x + residual
    return total, layer_norm(total, weight, bias, eps)


def quick_gelu(x):
    """The sigmoid approximation of GELU that OpenAI's models were trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x):
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def split_heads(qkv, heads):
    """(N, L, 3*D) packed projection -> q, k, v, each (N, heads, L, D // heads)."""
    n, length, three_width = qkv.shape
    head_dim = three_width // (3 * heads)
    return qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x):
    """(N, heads, L, head_dim) -> (N, L, heads * head_dim)."""
    return x.transpose(1, 2).flatten(2)


def attention(qkv, heads, causal):
    """Multi-head self-attention on a packed QKV projection.

    qkv: (N, L, 3*D), the output of ``in_proj``; returns (N, L, D), the input of ``out_proj``.
    The softmax runs in fp32 so that the reference is as exact as its inputs allow.
    """
    q, k, v = split_heads(qkv, heads)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        length = scores.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool, device=qkv.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return merge_heads(probs @ v)


def patch_embed(x, weight):
    """A ViT's patch embedding: the (N, C, H, W) image through its (D, C, P, P) convolution of
    stride P, as (N, H/P * W/P, D) tokens in row-major patch order."""
    return F.conv2d(x, weight, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)


def linear_act(x, weight, bias, activation, residual=None):
    """``activation(x @ weight.T + bias) + residual``: a linear layer with the epilogue the
    fused kernel computes; ``activation`` is ``"none"`` or a key of ``ACTIVATIONS``."""
    out = F.linear(x, weight, bias)
    if activation != "none":
        out = ACTIVATIONS[activation](out)
    return out if residual is None else out + residual


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """Linear -> activation -> Linear, the transformer block's feed-forward network, plus
    ``residual`` (the block's input) when given."""
    hidden = ACTIVATIONS[activation](F.linear(x, fc_weight, fc_bias))
    out = F.linear(hidden, proj_weight, proj_bias)
    return out if residual is None else residual + out


def attention_pool2d_tokens(x, positional_embedding):
    """(N, C, H, W) feature map -> (N, HW+1, C) tokens: the mean token first, positions added."""
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    return x + positional_embedding.to(x.dtype)


def attention_pool2d(x, positional_embedding, q_weight, q_bias, k_weight, k_bias,
                     v_weight, v_bias, c_weight, c_bias, heads):
    """OpenAI's AttentionPool2d: the mean token attends over all HW+1 tokens.

    This projects K and V for every token, exactly as OpenAI's formulation does;
    ``fastclip.ops.attention_pool`` computes the same with one query's algebra.
    """
    tokens = attention_pool2d_tokens(x, positional_embedding)
    n, length, width = tokens.shape
    head_dim = width // heads
    q = F.linear(tokens[:, :1], q_weight, q_bias).view(n, 1, heads, head_dim).transpose(1, 2)
    k = F.linear(tokens, k_weight, k_bias).view(n, length, heads, head_dim).transpose(1, 2)
    v = F.linear(tokens, v_weight, v_bias).view(n, length, heads, head_dim).transpose(1, 2)
    scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    pooled = merge_heads(probs @ v).squeeze(1)
    return F.linear(pooled, c_weight, c_bias)
