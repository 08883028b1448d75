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
goes when its weight goes, or when the weight next runs where the path does not apply) and
rebuilt when the weight is replaced or changed in place (its version counter moves, or its
storage is not the one the copy was made from). Writes through ``weight.data`` bypass the
version counter; call :func:`clear_cache` after them. Weights made under
``torch.inference_mode`` have no version counter: they are never cached, and run through
oneDNN as they are (slower: no packed layout, QuickGELU not fused). The copies cost
one more copy of each transformer weight in memory; setting the environment variable
``FASTCLIP_CPU_PREPACK=0`` turns the path off.
"""

import os

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.multiprocessing.reductions import StorageWeakRef
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


def _plain(tensor):
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided


def usable(x, *tensors):
    """Whether ``x`` times the weights in ``tensors`` can take the oneDNN path: plain CPU
    tensors of one supported dtype, no gradient to record (reverse or forward mode, or a
    ``torch.func`` transform), not traced by ``torch.jit``. Under ``torch.compile`` the path
    is an op of its own (``fastclip_cpu::linear``, ``fastclip_cpu::mlp``) that compiled
    graphs call."""
    if not enabled() or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    if torch.compiler.is_compiling():
        return _usable_when_compiling(x, tensors)
    if (not _plain(x) or torch.jit.is_tracing() or forward_ad._current_level >= 0
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for tensor in tensors:
        if tensor is None:
            continue
        if (not _plain(tensor) or tensor.device.type != "cpu" or tensor.dtype != x.dtype
                or (grad and tensor.requires_grad)):
            return False
    return True


def _usable_when_compiling(x, tensors):
    # What a compiled graph can check of its inputs: dtypes, devices and autograd (the eager
    # checks of tensor subclasses and function transforms do not trace).
    grad = torch.is_grad_enabled()
    return not (grad and x.requires_grad) and all(
        t is None or (t.device.type == "cpu" and t.dtype == x.dtype
                      and not (grad and t.requires_grad))
        for t in tensors)


def _cacheable(*weights):
    """Inference tensors (made under ``torch.inference_mode``) have no version counter, so an
    in-place write to one could not be told from the copy made before it: they are used as
    they are, never cached."""
    return not any(w is not None and w.is_inference() for w in weights)


def _stamp(weight):
    # A weak reference to the storage: it lets the storage's memory go with the weight (after
    # model.half(), say), but keeps its address from being reused by another storage while
    # the stamp lives, so comparing addresses tells storages apart exactly.
    return (weight._version, StorageWeakRef(weight.untyped_storage()), weight.dtype,
            weight.storage_offset(), weight.shape, weight.stride())


def _same(stamp, other):
    return (stamp[0] == other[0] and not stamp[1].expired()
            and stamp[1].cdata == other[1].cdata and stamp[2:] == other[2:])


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


def _evict(*weights):
    """Drop the copies of weights that now run elsewhere (another dtype or device, or with
    autograd), so that they do not hold memory until the weights go."""
    for weight in weights:
        if weight is not None and weight in _CACHE:
            del _CACHE[weight]


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


def _contiguous(tensor):
    # oneDNN reads the bias as a dense vector, whatever its strides.
    return tensor.contiguous() if tensor is not None else None


def clear_cache():
    """Drop every packed copy; they are rebuilt on next use."""
    _CACHE.clear()


def _product(x, weight, bias, attr="none", algorithm=""):
    """oneDNN's product on the packed weight, or on the weight as it is where that cannot be
    cached."""
    weight = packed_weight(weight) if _cacheable(weight) else weight.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, _contiguous(bias), attr, [], algorithm)


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``, on oneDNN where :func:`usable`."""
    if not usable(x, weight, bias):
        if not torch.compiler.is_compiling():
            _evict(weight)
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    return _product(x, weight, bias)


def patch_embed(x, weight):
    """``reference.patch_embed`` as one product: each patch's pixels (in the weight's
    (C, P, P) order) times the weight as a (D, C*P*P) matrix, packed and cached under the
    convolution's own weight. None where the oneDNN path does not apply."""
    if not usable(x, weight):
        if not torch.compiler.is_compiling():
            _evict(weight)
        return None
    n, channels, height, width = x.shape
    p_h, p_w = weight.shape[-2:]
    if weight.dim() != 4 or weight.shape[1] != channels or height % p_h or width % p_w:
        return None
    rows, columns = height // p_h, width // p_w
    patches = x.reshape(n, channels, rows, p_h, columns, p_w)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * columns, channels * p_h * p_w)
    if torch.compiler.is_compiling():
        return _patch_op(patches, weight)
    return _patch_product(patches, weight)


def _patch_product(patches, weight):
    matrix = (_cached(weight, ("patches",), lambda w: _pack(w.reshape(w.shape[0], -1)))
              if _cacheable(weight) else weight.reshape(weight.shape[0], -1).contiguous())
    return torch.ops.mkldnn._linear_pointwise(patches, matrix, None, "none", [], "")


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """c_fc -> activation -> c_proj (+ residual), with the activation fused into c_fc.

    Returns ``None`` where the oneDNN path does not apply, so the caller computes it as usual.
    """
    if (activation not in ("quick_gelu", "gelu")
            or not usable(x, fc_weight, fc_bias, proj_weight, proj_bias, residual)
            or (residual is not None
                and residual.shape != x.shape[:-1] + proj_weight.shape[:1])):
        if not torch.compiler.is_compiling():
            _evict(fc_weight, fc_bias, proj_weight)
        return None
    if torch.compiler.is_compiling():
        return _mlp_op(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)
    return _packed_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)


def _packed_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    if activation == "gelu":
        hidden = _product(x, fc_weight, fc_bias, "gelu", "none")
        proj = packed_weight(proj_weight) if _cacheable(proj_weight) else proj_weight.contiguous()
    elif _cacheable(fc_weight, fc_bias, proj_weight):
        hidden = torch.ops.mkldnn._linear_pointwise(
            x, packed_weight(fc_weight, QUICK_GELU_SCALE),
            _scaled_bias(fc_bias, QUICK_GELU_SCALE), "swish", [], "")
        proj = packed_weight(proj_weight, 1 / QUICK_GELU_SCALE)
    else:
        hidden = _product(x, fc_weight, fc_bias)
        hidden = hidden.mul_(torch.sigmoid_(hidden * QUICK_GELU_SCALE))
        proj = proj_weight.contiguous()
    proj_bias = _contiguous(proj_bias)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(hidden, proj, proj_bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(
        hidden, residual.contiguous(), proj, proj_bias, "add")


# The packed path as ops, for compiled graphs: opaque to the compiler, which would otherwise
# stop at the cache of packed weights. They are registered through torch.library's low-level
# API, so that a compiled graph's call is one dispatch rather than custom_op's Python wrapper
# too (some 230 calls per ViT-B/32 forward). They have CPU and fake kernels and no autograd
# kernel: the paths that call them run without autograd.
LIBRARY = torch.library.Library("fastclip_cpu", "DEF")


def cpu_op(schema, fake):
    """``fastclip_cpu::<schema>`` with the decorated function as its CPU kernel and ``fake``
    as its fake (meta) kernel; returns the op. Called with inputs that need gradients, it
    raises (without an autograd kernel, their gradients would be silently missing)."""
    def register(kernel):
        name = schema.split("(", 1)[0]

        def inference_only(*args):
            if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                               for a in args):
                raise RuntimeError(
                    f"fastclip_cpu::{name} computes inference only and has no gradient; "
                    "call it under torch.no_grad(), or use the torch backend's own path.")
            return kernel(*args)

        LIBRARY.define(schema)
        LIBRARY.impl(name, inference_only, "CPU")
        torch.library.register_fake(f"fastclip_cpu::{name}", fake, lib=LIBRARY)
        return getattr(torch.ops.fastclip_cpu, name).default
    return register


@cpu_op("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
        lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
def _linear_op(x, weight, bias):
    return _product(x, weight, bias)


@cpu_op("mlp(Tensor x, Tensor fc_weight, Tensor? fc_bias, Tensor proj_weight, "
        "Tensor? proj_bias, str activation, Tensor? residual) -> Tensor",
        lambda x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual:
        x.new_empty(*x.shape[:-1], proj_weight.shape[0]))
def _mlp_op(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    return _packed_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)


@cpu_op("patch_embed(Tensor patches, Tensor weight) -> Tensor",
        lambda patches, weight: patches.new_empty(*patches.shape[:-1], weight.shape[0]))
def _patch_op(patches, weight):
    return _patch_product(patches, weight)
