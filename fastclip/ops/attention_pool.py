"""Attention pooling with a single query: OpenAI's AttentionPool2d without building K and V.

The ResNets end in attention pooling: the mean of the HW feature vectors becomes a token, the
positions are added, and that one token attends over all HW+1 tokens. OpenAI's code projects K
and V for every token, 2 (HW+1) C^2 multiply-adds per image. With one query that is not needed:

- head h's score of token t is q_h . (W_k,h t + b_k,h) = (W_k,h^T q_h) . t + q_h . b_k,h, and
  the last term, the same for every token, cancels in the softmax;
- the probabilities sum to one, so sum_t p_t (W_v,h t + b_v,h) = W_v,h (sum_t p_t t) + b_v,h.

That is O(C^2 + heads (HW+1) C) per image instead of O(HW C^2), the same result up to rounding.

Two implementations compute it: the compiled op ``torch.ops.fastclip.attention_pool2d`` from
the extension ``fastclip._C`` (sources in ``csrc/``), and :func:`attention_pool2d_single_query`,
the same algebra in PyTorch, which runs where the extension is not built or has no kernel for
the device. :func:`attention_pool2d` chooses; :func:`extension_info` says what was found.
"""

import torch
import torch.nn.functional as F

from . import extension, reference

OP_NAME = "fastclip::attention_pool2d"
PARAMETER_NAMES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias",
                   "c_weight", "c_bias")

# Device types on which the compiled op runs; "meta" runs its fake implementation.
OP_DEVICES = frozenset(
    device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if extension.has_kernel(OP_NAME, key)
) | (frozenset({"meta"}) if extension.LOADED else frozenset())


def extension_info():
    """Which implementation attention pooling runs, for ``fastclip.info()`` and bug reports."""
    devices = sorted(OP_DEVICES - {"meta"})
    runs = (f"compiled op {OP_NAME} on {', '.join(devices)}; PyTorch single-query algebra "
            "elsewhere" if devices else "PyTorch single-query algebra on every device")
    return {"built": extension.LOADED, "cpu": "cpu" in devices, "cuda": "cuda" in devices,
            "error": extension.ERROR, "attention_pool2d": runs}


def check_inputs(x, positional_embedding, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                 c_weight, c_bias, heads):
    """Raise a ValueError naming the input that does not fit OpenAI's AttentionPool2d."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"attention_pool2d: x must be a (N, C, H, W) feature map; got {shape}.")
    _, channels, height, width = x.shape
    if not isinstance(heads, int) or heads <= 0 or channels % heads:
        raise ValueError(f"attention_pool2d: heads = {heads!r} must be a positive int that "
                         f"divides the channel count C = {channels}.")
    output_dim = c_weight.shape[0] if c_weight.dim() == 2 else -1
    expected = {
        "positional_embedding": ((height * width + 1, channels), "(H*W + 1, C)"),
        "q_weight": ((channels, channels), "(C, C)"), "q_bias": ((channels,), "(C,)"),
        "k_weight": ((channels, channels), "(C, C)"), "k_bias": ((channels,), "(C,)"),
        "v_weight": ((channels, channels), "(C, C)"), "v_bias": ((channels,), "(C,)"),
        "c_weight": ((output_dim, channels), "(output_dim, C)"), "c_bias": ((output_dim,),
                                                                       "(output_dim,)"),
    }
    tensors = dict(zip(("positional_embedding",) + PARAMETER_NAMES,
                       (positional_embedding, q_weight, q_bias, k_weight, k_bias, v_weight,
                        v_bias, c_weight, c_bias)))
    for name, tensor in tensors.items():
        shape, meaning = expected[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"attention_pool2d: {name} has shape {tuple(tensor.shape)} but "
                             f"must be {meaning} = {shape} for x of shape {tuple(x.shape)}.")
        if tensor.device != x.device:
            raise ValueError(f"attention_pool2d: {name} is on {tensor.device} but x is on "
                             f"{x.device}; move them to one device.")
        if name != "positional_embedding" and tensor.dtype != x.dtype:
            raise ValueError(f"attention_pool2d: {name} has dtype {tensor.dtype} but x has "
                             f"dtype {x.dtype}; convert the weights and the input to one dtype.")
    if not x.is_floating_point() or not positional_embedding.is_floating_point():
        raise ValueError("attention_pool2d: x and positional_embedding must be floating point; "
                         f"got {x.dtype} and {positional_embedding.dtype}.")


def _single_query_steps(x, positional_embedding, q_weight, q_bias, k_weight, v_weight, v_bias,
                        heads):
    """The algebra's intermediate results, shared by the forward and the backward."""
    tokens = reference.attention_pool2d_tokens(x, positional_embedding)  # (N, L, C)
    n, _, width = tokens.shape
    head_dim = width // heads
    query = F.linear(tokens[:, 0], q_weight, q_bias).view(n, heads, head_dim)
    # key_query[n, h] = W_k,h^T q_h; k_bias would add the same score to every token of a head.
    key_query = torch.einsum("nhd,hdc->nhc", query, k_weight.reshape(heads, head_dim, width))
    scores = (key_query * head_dim ** -0.5) @ tokens.transpose(1, 2)  # (N, heads, L)
    # The softmax runs in fp32 (fp64 for doubles), as the reference's does for low precision.
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    attended = probs.to(tokens.dtype) @ tokens  # (N, heads, C): sum_t p_t t, per head
    # W_v,h attended_h + b_v,h: each head's output, as if V had been built.
    pooled = torch.einsum("nhc,hdc->nhd", attended, v_weight.reshape(heads, head_dim, width))
    pooled = (pooled + v_bias.reshape(heads, head_dim)).flatten(1)  # (N, C)
    return tokens, query, key_query, probs, attended, pooled


def attention_pool2d_single_query(x, positional_embedding, q_weight, q_bias, k_weight, k_bias,
                                  v_weight, v_bias, c_weight, c_bias, heads):
    """OpenAI's AttentionPool2d by the single-query algebra, in PyTorch (differentiable).

    Same arguments and result as ``fastclip.reference.attention_pool2d``; ``k_bias`` does not
    change the result (it cancels in the softmax) and gets no gradient.
    """
    pooled = _single_query_steps(x, positional_embedding, q_weight, q_bias, k_weight, v_weight,
                                 v_bias, heads)[-1]
    return F.linear(pooled, c_weight, c_bias)


def _backward_from_inputs(grad, x, positional_embedding, q_weight, q_bias, k_weight, k_bias,
                          v_weight, v_bias, c_weight, c_bias, heads):
    """Gradients of the op for every input, recomputing the forward's intermediates (they cost
    O(C^2 + heads L C) per image, little next to what OpenAI's formulation builds)."""
    tokens, query, key_query, probs, attended, pooled = _single_query_steps(
        x, positional_embedding, q_weight, q_bias, k_weight, v_weight, v_bias, heads)
    n, length, width = tokens.shape
    head_dim = width // heads
    scale = head_dim ** -0.5
    v_heads = v_weight.reshape(heads, head_dim, width)
    grad_c_weight, grad_c_bias = grad.t() @ pooled, grad.sum(0)
    grad_pooled = (grad @ c_weight).view(n, heads, head_dim)
    grad_v_bias = grad_pooled.sum(0).flatten()
    grad_v_weight = torch.einsum("nhd,nhc->hdc", grad_pooled, attended).reshape(width, width)
    grad_attended = torch.einsum("nhd,hdc->nhc", grad_pooled, v_heads)  # (N, heads, C)
    # Through the softmax (in fp32, as the forward): dscore = p (dp - sum_t p dp).
    grad_probs = (grad_attended @ tokens.transpose(1, 2)).to(probs.dtype)  # (N, heads, L)
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    grad_scores = (grad_scores * scale).to(tokens.dtype)
    grad_tokens = (probs.to(tokens.dtype).transpose(1, 2) @ grad_attended
                   + grad_scores.transpose(1, 2) @ key_query)  # (N, L, C)
    grad_key_query = grad_scores @ tokens  # (N, heads, C)
    grad_query = torch.einsum("nhc,hdc->nhd", grad_key_query,
                              k_weight.reshape(heads, head_dim, width)).flatten(1)
    grad_k_weight = torch.einsum("nhd,nhc->hdc", query, grad_key_query).reshape(width, width)
    grad_q_weight, grad_q_bias = grad_query.t() @ tokens[:, 0], grad_query.sum(0)
    grad_mean_token = grad_tokens[:, 0] + grad_query @ q_weight  # (N, C)
    grad_tokens = torch.cat([grad_mean_token[:, None], grad_tokens[:, 1:]], dim=1)
    grad_positional = grad_tokens.sum(0).to(positional_embedding.dtype)
    # Token 0 is the mean of the HW positions, so each position gets 1/HW of its gradient.
    grad_map = grad_tokens[:, 1:] + grad_mean_token[:, None] / (length - 1)  # (N, HW, C)
    grad_x = grad_map.transpose(1, 2).reshape(x.shape)
    return (grad_x, grad_positional, grad_q_weight, grad_q_bias, grad_k_weight, None,
            grad_v_weight, grad_v_bias, grad_c_weight, grad_c_bias, None)


def _register_op_python_side():
    """The fake implementation (for torch.compile and meta tensors) and the autograd formula."""

    @torch.library.register_fake(OP_NAME)
    def _(x, pos, q_w, q_b, k_w, k_b, v_w, v_b, c_w, c_b, heads):
        torch._check(x.dim() == 4, lambda: "attention_pool2d: x must be (N, C, H, W)")
        return x.new_empty((x.shape[0], c_w.shape[0]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:10])
        ctx.heads = inputs[10]

    def backward(ctx, grad):
        return _backward_from_inputs(grad, *ctx.saved_tensors, ctx.heads)

    torch.library.register_autograd(OP_NAME, backward, setup_context=setup_context)


if extension.LOADED:
    _register_op_python_side()


def _zeros_if_none(bias, size, like):
    return torch.zeros(size, dtype=like.dtype, device=like.device) if bias is None else bias


def attention_pool2d(x, positional_embedding, q_weight, q_bias, k_weight, k_bias, v_weight,
                     v_bias, c_weight, c_bias, heads):
    """OpenAI's AttentionPool2d on a (N, C, H, W) map -> (N, output_dim), by the single-query
    algebra: the compiled op where ``fastclip._C`` has a kernel for ``x``'s device, else
    :func:`attention_pool2d_single_query`. Same signature as ``reference.attention_pool2d``.
    """
    channels = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else 0
    q_bias, k_bias, v_bias = (_zeros_if_none(b, channels, q_weight)
                              for b in (q_bias, k_bias, v_bias))
    c_bias = _zeros_if_none(c_bias, c_weight.shape[0], c_weight)
    args = (x, positional_embedding, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
            c_weight, c_bias, heads)
    check_inputs(*args)
    if x.device.type in OP_DEVICES:
        return torch.ops.fastclip.attention_pool2d(*args)
    return attention_pool2d_single_query(*args)
