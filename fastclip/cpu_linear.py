"""Linear layers for CPU inference, on weights reordered once into oneDNN's blocked layout.

``F.linear`` on the CPU hands the BLAS the weight in its plain layout on every call, and the
BLAS packs it into blocks as it goes; oneDNN's ``mkldnn::_linear_pointwise`` takes a weight
reordered once (``mkldnn::_reorder_linear_weight``, the op PyTorch's own CPU compiler uses
when it freezes weights) and can apply an activation, or add a residual, to the product
before writing it. The ``torch`` backend routes a transformer's linear layers here when they
run on the CPU without a gradient; the results match ``F.linear`` to the rounding of the
product's order.

QuickGELU is ``z * sigmoid(1.702 z)``; oneDNN's fused ``swish`` is ``u * sigmoid(u)``. With
``u = 1.702 z``, ``swish(u) = 1.702 QuickGELU(z)``: so the hidden layer's weight and bias are
packed multiplied by 1.702 and the output layer's weight divided by it, and the MLP computes
the same function with its activation in the first product's epilogue.

The reordered copies are cached per weight tensor (the weights are held weakly: a cached copy
goes when its weight goes) and rebuilt when the weight is replaced or changed in place
(its version counter moves, or its storage is not the one the copy was made from). Writes
through ``weight.data``, and in-place writes to weights made under ``torch.inference_mode``
(which have no version counter), are not seen; call :func:`clear_cache` after them.
The copies cost one more copy of each transformer weight in memory; setting the environment
variable ``FASTCLIP_CPU_PREPACK=0`` turns the path off.
"""

import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

QUICK_GELU_SCALE = 1.702

_ENABLED = os.environ.get("FASTCLIP_CPU_PREPACK", "1") != "0"
_CACHE = WeakTensorKeyDictionary()


def _op_available():
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


_OP_AVAILABLE = _op_available()


def _bf16_supported():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _OP_AVAILABLE and _bf16_supported() else ())


def enabled():
    """Whether this process may use packed weights at all (oneDNN present, not switched off)."""
    return _ENABLED and _OP_AVAILABLE and torch.backends.mkldnn.enabled


def dtype_names():
    """The dtypes whose CPU products take the packed path here (none when not :func:`enabled`)."""
    return [str(dtype).removeprefix("torch.") for dtype in _DTYPES] if enabled() else []


def usable(x, *tensors):
    """Whether ``x`` times the weights in ``tensors`` can take the packed path: CPU tensors of
    one supported dtype, no gradient to record, not being traced by ``torch.compile``."""
    if not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for tensor in tensors:
        if tensor is None:
            continue
        if (type(tensor) not in (torch.Tensor, torch.nn.Parameter)
                or tensor.device.type != "cpu" or tensor.dtype != x.dtype
                or tensor.layout != torch.strided or (grad and tensor.requires_grad)):
            return False
    return True


def _stamp(weight):
    # Inference tensors (made under torch.inference_mode) have no version counter; they
    # can only be written in place inside inference mode, which clear_cache() must follow.
    return (None if weight.is_inference() else weight._version, weight.untyped_storage(), weight.dtype, weight.storage_offset(),
            weight.shape, weight.stride())


def _same(stamp, other):
    # The stamp holds the weight's storage, so no new storage can reuse its address while the
    # cached copy lives; comparing storages by their C pointer is then exact.
    return (stamp[0] == other[0] and stamp[1]._cdata == other[1]._cdata
            and stamp[2:] == other[2:])


def _cached(weight, variant, build):
    entries = _CACHE.get(weight)
    if entries is None:
        entries = {}
        _CACHE[weight] = entries
    stamp = _stamp(weight)
    entry = entries.get(variant)
    if entry is None or not _same(entry[0], stamp):
        with torch.no_grad():
            entry = (stamp, build(weight.detach()))
        entries[variant] = entry
    return entry[1]


def _scaled(tensor, scale):
    return (tensor.float() * scale).to(tensor.dtype)


def _pack(weight, scale=None):
    if scale is not None:
        weight = _scaled(weight, scale)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def packed_weight(weight, scale=None):
    """``weight`` (optionally times ``scale``) reordered for oneDNN, cached."""
    return _cached(weight, ("weight", scale), lambda w: _pack(w, scale))


def _scaled_bias(bias, scale):
    if bias is None:
        return None
    return _cached(bias, ("bias", scale), lambda b: _scaled(b, scale).contiguous())


def _contiguous(bias):
    # oneDNN reads the bias as a dense vector, whatever its strides.
    return bias.contiguous() if bias is not None else None


def clear_cache():
    """Drop every packed copy; they are rebuilt on next use."""
    _CACHE.clear()


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``, on the packed weight where :func:`usable`."""
    if not usable(x, weight, bias):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(
        x, packed_weight(weight), _contiguous(bias), "none", [], "")


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """c_fc -> activation -> c_proj (+ residual), with the activation fused into c_fc.

    Returns ``None`` where the packed path does not apply, so the caller computes it as usual.
    """
    if activation not in ("quick_gelu", "gelu") or not usable(
            x, fc_weight, fc_bias, proj_weight, proj_bias, residual):
        return None
    if residual is not None and residual.shape != x.shape[:-1] + proj_weight.shape[:1]:
        return None
    if activation == "quick_gelu":
        hidden = torch.ops.mkldnn._linear_pointwise(
            x, packed_weight(fc_weight, QUICK_GELU_SCALE),
            _scaled_bias(fc_bias, QUICK_GELU_SCALE), "swish", [], "")
        proj = packed_weight(proj_weight, 1 / QUICK_GELU_SCALE)
    else:
        hidden = torch.ops.mkldnn._linear_pointwise(
            x, packed_weight(fc_weight), _contiguous(fc_bias), "gelu", [], "none")
        proj = packed_weight(proj_weight)
    proj_bias = _contiguous(proj_bias)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(hidden, proj, proj_bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(
        hidden, residual.contiguous(), proj, proj_bias, "add")
