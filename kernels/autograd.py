"""Backward passes for the Triton ops.

The fused kernels are forward-only. Each op's gradient is that of its plain-PyTorch
reference, recomputed from the saved inputs (activation checkpointing, in effect), so a model
on ``backend="triton"`` trains correctly; its backward is not fused.
"""

import torch
import torch.nn.functional as F

from fastclip import reference

from .attention import attention
from .layer_norm import add_layer_norm, layer_norm
from .linear import linear_act


def linear_act_reference(x, weight, bias, activation, residual=None):
    """``activation(x @ weight.T + bias) + residual`` in plain PyTorch."""
    out = F.linear(x, weight, bias)
    if activation != "none":
        out = reference.ACTIVATIONS[activation](out)
    return out if residual is None else out + residual


def register_recomputed_backward(op, reference_fn):
    """Give ``op`` the backward of ``reference_fn`` (same arguments, same outputs)."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions))
        ctx.other_inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def backward(ctx, *grad_outputs):
        inputs = list(ctx.other_inputs)
        wanted = []
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
            needs_grad = ctx.needs_input_grad[position]
            inputs[position] = tensor.detach().requires_grad_(needs_grad)
            if needs_grad:
                wanted.append(position)
        grads = [None] * len(inputs)
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            outputs = reference_fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None]
        computed = torch.autograd.grad([out for out, _ in pairs], [inputs[p] for p in wanted],
                                       [grad for _, grad in pairs], allow_unused=True)
        for position, grad in zip(wanted, computed):
            grads[position] = grad
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


register_recomputed_backward(layer_norm, reference.layer_norm)
register_recomputed_backward(add_layer_norm, reference.add_layer_norm)
register_recomputed_backward(attention, reference.attention)
register_recomputed_backward(linear_act, linear_act_reference)
