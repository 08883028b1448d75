"""fastclip's Triton kernels, one fused op per module, each a registered torch op
(``torch.ops.fastclip_triton.<name>``) with a fake implementation for ``torch.compile``.

A leaf: nothing here imports the rest of fastclip. The ops are forward kernels; their
backward passes are registered by ``fastclip.ops.triton_autograd``. Importing this package
needs triton but no GPU. Set ``TRITON_INTERPRET=1`` before the first
import to run the kernels on CPU tensors in Triton's interpreter (for tests).
"""

import torch

from .attention import attention, attention_refusal
from .common import INTERPRETED
from .layer_norm import add_layer_norm, layer_norm, layer_norm_refusal
from .linear import linear_act, linear_act_refusal, mlp

__all__ = ["INTERPRETED", "add_layer_norm", "attention", "attention_refusal",
           "check_backend_device", "layer_norm", "layer_norm_refusal", "linear_act",
           "linear_act_refusal", "mlp"]


def check_backend_device(device):
    """Raise a clear error if the kernels cannot run on ``device`` in this process."""
    kind = torch.device(device).type
    if INTERPRETED and kind != "cpu":
        raise ValueError(
            f"backend='triton' on {device}: this process set TRITON_INTERPRET=1, so the kernels "
            "run in Triton's CPU interpreter. Unset TRITON_INTERPRET to run them on CUDA.")
    if not INTERPRETED and kind != "cuda":
        raise ValueError(
            f"backend='triton' needs a CUDA device, not {device}. Use backend='torch' on the "
            "CPU, or set TRITON_INTERPRET=1 before importing fastclip to test the kernels there.")
