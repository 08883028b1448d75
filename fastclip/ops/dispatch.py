"""The one place that decides which implementation computes each op of CLIP's blocks.

The model's blocks call ``self.ops.linear(...)``, ``self.ops.layer_norm(...)``,
``self.ops.attention(...)``, ``self.ops.mlp(...)`` and ``self.ops.attention_pool2d(...)``;
``self.ops`` is a :class:`Backend`, set on every block by ``CLIP.set_backend``. The model
never branches on backends itself.

Backends:

- ``reference``: OpenAI's math in plain PyTorch (``reference``), what every kernel is tested
  against.
- ``torch``: the fastest path that needs no Triton: ``F.scaled_dot_product_attention``,
  PyTorch ops, and on the CPU oneDNN products on prepacked weights with the MLP's activation
  and residual add fused in (``torch_backend``, ``cpu_linear``).
- ``triton``: fused Triton kernels (``fastclip.kernels``), each op falling back to the torch
  backend's for the calls its kernel cannot compute (``triton_backend``); needs a CUDA
  device, or ``TRITON_INTERPRET=1`` to run on CPU tensors for testing.
- ``auto``: on a CUDA device where Triton imports, for each op and class of shapes the Triton
  kernel or the torch op, whichever is correct and faster there, measured on the first call
  (``measured``); elsewhere ``torch``.

The environment variable ``FASTCLIP_BACKEND`` has the same meaning as ``load(backend=...)``
and is read when the argument is ``"auto"``.
"""

import os
from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_pool, reference, torch_backend

BACKEND_NAMES = ("auto", "triton", "torch", "reference")


# The contract: every backend provides these six ops, with these signatures and the results
# of ``reference``'s functions of the same names. Tensors are batch-first, (N, L, D).

class Linear(Protocol):
    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor: ...


class LayerNorm(Protocol):
    """LayerNorm over the last dimension, computed in fp32, returned in ``x``'s dtype."""
    def __call__(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float) -> Tensor: ...


class AddLayerNorm(Protocol):
    """``(x + residual, layer_norm(x + residual))``."""
    def __call__(self, x: Tensor, residual: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]: ...


class Attention(Protocol):
    """Self-attention on a packed (N, L, 3D) projection -> (N, L, D)."""
    def __call__(self, qkv: Tensor, heads: int, causal: bool) -> Tensor: ...


class MLP(Protocol):
    """``c_proj(activation(c_fc(x))) + residual``; ``activation`` is a key of
    ``reference.ACTIVATIONS``."""
    def __call__(self, x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor],
                 proj_weight: Tensor, proj_bias: Optional[Tensor], activation: str,
                 residual: Optional[Tensor] = None) -> Tensor: ...


class PatchEmbed(Protocol):
    """A ViT's (N, C, H, W) image through its (D, C, P, P) stride-P convolution -> (N, L, D)."""
    def __call__(self, x: Tensor, weight: Tensor) -> Tensor: ...


class AttentionPool2d(Protocol):
    """OpenAI's AttentionPool2d of a (N, C, H, W) map -> (N, output_dim)."""
    def __call__(self, x: Tensor, positional_embedding: Tensor, q_weight: Tensor,
                 q_bias: Optional[Tensor], k_weight: Tensor, k_bias: Optional[Tensor],
                 v_weight: Tensor, v_bias: Optional[Tensor], c_weight: Tensor,
                 c_bias: Optional[Tensor], heads: int) -> Tensor: ...


@dataclass(frozen=True)
class Backend:
    """One implementation of each op of the contract above."""
    name: str
    linear: Linear
    layer_norm: LayerNorm
    add_layer_norm: AddLayerNorm
    attention: Attention
    mlp: MLP
    attention_pool2d: AttentionPool2d
    patch_embed: PatchEmbed

    def __repr__(self):
        return f"Backend({self.name!r})"


OPS = ("linear", "layer_norm", "add_layer_norm", "attention", "mlp", "attention_pool2d",
       "patch_embed")

REFERENCE = Backend(
    name="reference",
    linear=F.linear,
    layer_norm=reference.layer_norm,
    add_layer_norm=reference.add_layer_norm,
    attention=reference.attention,
    mlp=reference.mlp,
    attention_pool2d=reference.attention_pool2d,
    patch_embed=reference.patch_embed,
)

TORCH = Backend(
    name="torch",
    linear=torch_backend.linear,
    layer_norm=torch_backend.layer_norm,
    add_layer_norm=torch_backend.add_layer_norm,
    attention=torch_backend.attention,
    mlp=torch_backend.mlp,
    attention_pool2d=attention_pool.attention_pool2d,
    patch_embed=torch_backend.patch_embed,
)


def _triton_backend(device=None):
    """Build the Triton backend, or raise a clear error saying why it cannot run here.

    The kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
    before fastclip's kernels were first imported (Triton's interpreter, for testing).
    """
    try:
        from .. import kernels
        from . import triton_backend
    except ImportError as error:
        raise RuntimeError(
            f"backend='triton' needs the triton package, which did not import ({error}). "
            "Install triton, or use backend='torch'.") from error
    if device is not None:
        kernels.check_backend_device(device)
    return Backend(
        name="triton",
        linear=F.linear,
        layer_norm=triton_backend.layer_norm,
        add_layer_norm=triton_backend.add_layer_norm,
        attention=triton_backend.attention,
        mlp=triton_backend.mlp,
        attention_pool2d=attention_pool.attention_pool2d,
        patch_embed=torch_backend.patch_embed,
    )


_DECISIONS = {}  # device -> the measured backend's decisions, shared by its models


def measured_backend(device, decisions=None, timer=None):
    """The measured ``auto`` backend for ``device`` (see ``measured``). ``decisions`` and
    ``timer`` replace the machine's decision file and the CUDA-event timer, for tests."""
    from .. import kernels
    from . import measured, triton_backend
    if decisions is None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in _DECISIONS:
            _DECISIONS[key] = measured.decisions_for(device)
        decisions = _DECISIONS[key]
    ops = measured.Measured(
        kernels={"layer_norm": triton_backend.layer_norm,
                 "add_layer_norm": triton_backend.add_layer_norm,
                 "attention": triton_backend.attention, "mlp": triton_backend.mlp},
        refusals={
            "layer_norm": lambda x, w, b, eps: kernels.layer_norm_refusal(x, None, w, b),
            "add_layer_norm": lambda x, r, w, b, eps: kernels.layer_norm_refusal(x, r, w, b),
            "attention": lambda qkv, heads, causal: kernels.attention_refusal(qkv, heads),
            "mlp": lambda x, fw, fb, pw, pb, act, residual=None:
                kernels.linear_act_refusal(x, fw, fb, act)},
        decisions=decisions, timer=timer or measured.cuda_event_timer)
    return Backend(name="auto", linear=F.linear, layer_norm=ops.op("layer_norm"),
                   add_layer_norm=ops.op("add_layer_norm"), attention=ops.op("attention"),
                   mlp=ops.op("mlp"), attention_pool2d=attention_pool.attention_pool2d,
                   patch_embed=torch_backend.patch_embed)


def auto_decisions():
    """``{"op class": decision}`` of the measured ``auto`` backend, in this process."""
    listing = {}
    for decisions in _DECISIONS.values():
        listing.update(decisions.listing())
    return listing


def triton_fallbacks():
    """``{"op: reason": calls}``: the triton backend's calls that ran the torch op, in this
    process (empty when the backend was never built)."""
    import sys
    backend = sys.modules.get("fastclip.ops.triton_backend")
    return backend.fallbacks() if backend is not None else {}


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
        if triton_available(device):
            return measured_backend(device)
        name = "torch"
    if name == "reference":
        return REFERENCE
    if name == "torch":
        return TORCH
    return _triton_backend(device)


class ComputesWithBackend:
    """Mixed into every module that computes through ``self.ops``. ``CLIP.set_backend`` sets
    ``ops`` on every instance of it, subclasses included, so no block can keep another
    backend than the model's."""
    ops: Backend = REFERENCE
