"""Backward passes for the Triton ops of ``fastclip.kernels``.

The fused kernels are forward-only, and ``fastclip.kernels`` knows nothing of fastclip's
references; this module joins them. Each op's gradient is that of its plain-PyTorch
reference, recomputed from the saved inputs (activation checkpointing, in effect), so a model
on ``backend="triton"`` trains correctly; its backward is not fused.
"""

import torch

from .. import kernels
from . import reference


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


register_recomputed_backward(kernels.layer_norm, reference.layer_norm)
register_recomputed_backward(kernels.add_layer_norm, reference.add_layer_norm)
register_recomputed_backward(kernels.attention, reference.attention)
register_recomputed_backward(kernels.linear_act, reference.linear_act)
