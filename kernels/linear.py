"""Linear layer with its bias, activation and residual add in the matmul's epilogue.

``linear_act(x, weight, bias, "quick_gelu")`` is the MLP's first layer (``c_fc`` then
QuickGELU) in one kernel: the activation is applied to the fp32 accumulator before the
single rounding to the output dtype, so the 4x-wide hidden activation is written once and
never re-read for the activation. ``residual`` adds a tensor after the activation (the MLP's
second layer and the block's residual add).
"""

import torch
import triton
import triton.language as tl

from .common import (
    check_device,
    check_dtype,
    dot_precision,
    on_device_of,
    refusal,
    rows,
    upcast_dot,
)

ACTIVATIONS = ("none", "quick_gelu", "gelu")


@triton.jit
def _linear_act_kernel(
    X,  # (M, K) input, unit column stride
    W,  # (N, K) weight, nn.Linear's layout
    BIAS,  # (N,), when HAS_BIAS
    RESIDUAL,  # (M, N) added after the activation, when HAS_RESIDUAL
    OUT,  # (M, N), contiguous
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_om,
    ACTIVATION: tl.constexpr,  # "none", "quick_gelu" or "gelu"
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks that share weight columns while they are in L2
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Grouped ordering: consecutive programs walk down GROUP_M row blocks of one column
    # block, so a weight tile is reused from L2 before it is evicted.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    block_n = (pid % (GROUP_M * blocks_n)) // group_size

    offs_m = (block_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (block_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    # W^T as (BLOCK_K, BLOCK_N): a strided load, no transpose in memory.
    w_ptrs = W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_k in range(0, K, BLOCK_K):
        k_left = K - start_k
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0.0)
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "quick_gelu":
        acc = acc * tl.sigmoid(1.702 * acc)
    elif ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + offs_m[:, None] * stride_rm + offs_n[None, :],
                           mask=out_mask, other=0.0)
        acc += residual.to(tl.float32)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(OUT.dtype.element_ty), mask=out_mask)


def _check(x, weight, bias, activation, residual):
    check_device("linear_act", x, weight, bias, residual)
    check_dtype("linear_act", "x", x)
    check_dtype("linear_act", "weight", weight, x.dtype)
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastclip Triton op linear_act: unknown activation {activation!r}; "
                         f"choose one of {ACTIVATIONS}.")
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastclip Triton op linear_act: x has shape {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}; expected x (..., K) and weight (N, K).")
    out_shape = (*x.shape[:-1], weight.shape[0])
    if bias is not None:
        check_dtype("linear_act", "bias", bias, x.dtype)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"fastclip Triton op linear_act: bias has shape "
                             f"{tuple(bias.shape)}; expected ({weight.shape[0]},).")
    if residual is not None:
        check_dtype("linear_act", "residual", residual, x.dtype)
        if residual.shape != out_shape:
            raise ValueError(f"fastclip Triton op linear_act: residual has shape "
                             f"{tuple(residual.shape)}; expected the output's {out_shape}.")
    return out_shape


def launch_options(m, dtype, activation, has_bias, has_residual):
    """The kernel's compile-time parameters and launch options for ``m`` rows, chosen by
    shape rather than autotuned, so the first call is not slowed and launches can be
    captured in CUDA graphs. fp32 tiles take a shorter K step to fit the shared memory."""
    block_k = 32 if dtype == torch.float32 else 64
    if m <= 64:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 4
    else:
        block_m, block_n, num_warps, num_stages = 128, 128, 8, 3
    return dict(ACTIVATION=activation, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                DOT_PRECISION=dot_precision(dtype), UPCAST_DOT=upcast_dot(dtype),
                num_warps=num_warps, num_stages=num_stages)


@torch.library.custom_op("fastclip_triton::linear_act", mutates_args=())
def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               activation: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``activation(x @ weight.T + bias) + residual`` with one rounding to x's dtype."""
    out_shape = _check(x, weight, bias, activation, residual)
    x2 = rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    residual2 = rows(residual) if residual is not None else out
    options = launch_options(m, x.dtype, activation, bias is not None, residual is not None)
    if m > 0 and n > 0:
        grid = (triton.cdiv(m, options["BLOCK_M"]) * triton.cdiv(n, options["BLOCK_N"]),)
        with on_device_of(x2):
            _linear_act_kernel[grid](
                x2, weight, bias.contiguous() if bias is not None else weight, residual2, out,
                m, n, k, x2.stride(0), weight.stride(0), weight.stride(1),
                residual2.stride(0), out.stride(0), **options)
    return out.view(out_shape)


@linear_act.register_fake
def _(x, weight, bias, activation, residual=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=None):
    """The transformer block's MLP (plus ``residual``, when given): ``c_fc`` with its
    activation fused in one kernel, then ``c_proj`` through PyTorch's linear (cuBLAS), which a
    Triton matmul does not beat."""
    hidden = linear_act(x, fc_weight, fc_bias, activation)
    out = torch.nn.functional.linear(hidden, proj_weight, proj_bias)
    return out if residual is None else residual + out


def linear_act_refusal(x, weight, bias, activation, residual=None):
    """Why :func:`linear_act` cannot compute this call, or None."""
    return refusal(_check, x, weight, bias, activation, residual)
