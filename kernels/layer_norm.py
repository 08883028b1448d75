"""LayerNorm, and the residual add fused with the LayerNorm that follows it.

One program normalizes one row. Statistics are computed in fp32 whatever the input dtype
(as OpenAI's fp16 LayerNorm does); the output has the input's dtype. ``add_layer_norm``
rounds ``x + residual`` to the input dtype before normalizing, so it normalizes exactly the
sum it returns, as the unfused ``x = x + r; layer_norm(x)`` does.
"""

import torch
import triton
import triton.language as tl

from .common import check_device, check_dtype, on_device_of, refusal, rows

MAX_WIDTH = 4096


@triton.jit
def _layer_norm_kernel(
    X,  # (rows, width) input, unit column stride
    RESIDUAL,  # (rows, width) added to X when HAS_RESIDUAL
    SUM,  # (rows, width) output X + RESIDUAL, when HAS_RESIDUAL
    Y,  # (rows, width) normalized output
    W,  # (width,) scale, when HAS_WEIGHT
    B,  # (width,) shift, when HAS_BIAS
    stride_x,  # row strides of X, RESIDUAL, SUM and Y
    stride_residual,
    stride_sum,
    stride_y,
    width,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,  # power of two >= width
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(SUM.dtype.element_ty)
        tl.store(SUM + row * stride_sum + cols, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / width
    y = centered / tl.sqrt(variance + eps)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def launch_options(width, has_residual, has_weight, has_bias):
    """The kernel's compile-time parameters and launch options: one row per program, with
    one warp per 256 columns (up to 8)."""
    block = triton.next_power_of_2(width)
    return dict(HAS_RESIDUAL=has_residual, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
                BLOCK=block, num_warps=min(max(block // 256, 1), 8))


def _check(op, x, residual, weight, bias):
    check_device(op, x, residual, weight, bias)
    check_dtype(op, "x", x)
    width = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or not 0 < width <= MAX_WIDTH:
        raise ValueError(f"fastclip Triton op {op}: x has shape {tuple(x.shape)}; the last "
                         f"dimension (the normalized width) must be 1 to {MAX_WIDTH}.")
    if residual is not None:
        check_dtype(op, "residual", residual, x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"fastclip Triton op {op}: residual has shape "
                             f"{tuple(residual.shape)} but x has {tuple(x.shape)}.")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_dtype(op, name, param)
            if param.shape != (width,):
                raise ValueError(f"fastclip Triton op {op}: {name} has shape "
                                 f"{tuple(param.shape)}; expected ({width},).")


def _launch(x, residual, weight, bias, eps):
    """Normalize ``x`` (plus ``residual``); returns (sum or None, normalized)."""
    width = x.shape[-1]
    x2 = rows(x)
    residual2 = rows(residual) if residual is not None else x2
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else x2
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        with on_device_of(x2):
            _layer_norm_kernel[(x2.shape[0],)](
                x2, residual2, total, y,
                weight.contiguous() if weight is not None else x2,
                bias.contiguous() if bias is not None else x2,
                x2.stride(0), residual2.stride(0), total.stride(0), y.stride(0),
                width, eps,
                **launch_options(width, residual is not None, weight is not None,
                                 bias is not None))
    total = total.view(x.shape) if residual is not None else None
    return total, y.view(x.shape)


@torch.library.custom_op("fastclip_triton::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``; fp32 statistics, output in x's dtype."""
    _check("layer_norm", x, None, weight, bias)
    return _launch(x, None, weight, bias, eps)[1]


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastclip_triton::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, layer_norm(x + residual))`` in one pass over memory."""
    _check("add_layer_norm", x, residual, weight, bias)
    return _launch(x, residual, weight, bias, eps)


@add_layer_norm.register_fake
def _(x, residual, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


def layer_norm_refusal(x, residual, weight, bias):
    """Why :func:`layer_norm` (``residual`` None) or :func:`add_layer_norm` cannot compute
    this call, or None."""
    return refusal(_check, "layer_norm" if residual is None else "add_layer_norm", x,
                   residual, weight, bias)
