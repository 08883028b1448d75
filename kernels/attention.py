"""Multi-head self-attention, flash-style, straight from the packed QKV projection.

The kernel reads Q, K and V with strides from ``in_proj``'s output ``(N, L, 3*D)`` (columns
``[q heads | k heads | v heads]``, as ``nn.MultiheadAttention`` packs them), so no split,
transpose or copy happens, and it writes ``(N, L, D)`` with the heads side by side: the
layout ``out_proj`` reads. Each program owns ``BLOCK_M`` queries of one (sequence, head) and
streams over the keys with an online softmax (running max and sum, in fp32), so the L x L
score matrix never reaches global memory.
"""

import torch
import triton
import triton.language as tl

from .common import check_device, check_dtype, dot_precision, on_device_of, refusal, upcast_dot

MAX_LENGTH = 1024
HEAD_DIMS = (32, 64, 80, 128)

LOG2_E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    QKV,  # (N, L, 3 * heads * HEAD_DIM) packed projection, unit column stride
    OUT,  # (N, L, heads * HEAD_DIM), contiguous
    stride_qkv_n,
    stride_qkv_l,
    stride_out_n,
    stride_out_l,
    length,  # L
    heads,
    scale_log2,  # head_dim ** -0.5 * log2(e): the softmax runs in base 2
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= HEAD_DIM (80 is padded to 128 and masked)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # (sequence, head) pairs on the first grid axis, whose limit is 2^31 - 1 rather than
    # the 65535 of the others: a batch of 8192 sequences of 12 heads needs 98304.
    sequence_head = tl.program_id(0)
    block_m = tl.program_id(1)
    n = (sequence_head // heads).to(tl.int64)
    head = sequence_head % heads
    width = heads * HEAD_DIM

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = QKV + n * stride_qkv_n + head * HEAD_DIM
    q = tl.load(base + offs_m[:, None] * stride_qkv_l + offs_d[None, :],
                mask=(offs_m[:, None] < length) & d_mask[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Causal: keys after this block's last query are all masked, so they are not visited.
    if CAUSAL:
        end_n = tl.minimum(length, (block_m + 1) * BLOCK_M)
    else:
        end_n = length
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[None, :] < length) & d_mask[:, None]
        # K^T as (BLOCK_D, BLOCK_N): a strided load, no transpose in memory.
        k = tl.load(base + width + offs_n[None, :] * stride_qkv_l + offs_d[:, None],
                    mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        visible = offs_n[None, :] < length
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Every row sees key 0 in the first step, so the running max is finite from then on.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        v = tl.load(base + 2 * width + offs_n[:, None] * stride_qkv_l + offs_d[None, :],
                    mask=(offs_n[:, None] < length) & d_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = acc * rescale[:, None] + tl.dot(probs, v.to(tl.float32),
                                                  input_precision=DOT_PRECISION)
        else:
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v,
                                                  input_precision=DOT_PRECISION)
        running_max = new_max

    out = acc / running_sum[:, None]
    out_ptrs = (OUT + n * stride_out_n + head * HEAD_DIM
                + offs_m[:, None] * stride_out_l + offs_d[None, :])
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < length) & d_mask[None, :])


def _check(qkv, heads):
    check_device("attention", qkv)
    check_dtype("attention", "qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"fastclip Triton op attention: qkv has shape {tuple(qkv.shape)}; "
                         "expected (N, L, 3 * width), the packed in_proj output.")
    n, length, three_width = qkv.shape
    if heads <= 0 or three_width % (3 * heads):
        raise ValueError(f"fastclip Triton op attention: qkv's last dimension {three_width} "
                         f"is not 3 * heads * head_dim for heads={heads}.")
    head_dim = three_width // (3 * heads)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"fastclip Triton op attention: head dim {head_dim} is not supported; "
                         f"the kernel handles {HEAD_DIMS}. Use backend='torch' for this model.")
    if not 0 < length <= MAX_LENGTH:
        raise ValueError(f"fastclip Triton op attention: sequence length {length} is outside "
                         f"1..{MAX_LENGTH}.")
    return head_dim


def launch_options(length, head_dim, dtype, causal):
    """The kernel's compile-time parameters and launch options for one shape, chosen by shape
    rather than autotuned, so the first call is not slowed and launches can be captured in
    CUDA graphs. Short sequences (CLIP's 50 and 77 tokens) use 64-query blocks so fewer
    padded rows are computed; fp32 tiles are smaller so they fit an A100's shared memory."""
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    elif length <= 64:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 3
    elif head_dim >= 128:
        block_m, block_n, num_warps, num_stages = 64, 64, 8, 3
    elif length >= 512:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    return dict(CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=dot_precision(dtype),
                UPCAST_DOT=upcast_dot(dtype), num_warps=num_warps, num_stages=num_stages)


@torch.library.custom_op("fastclip_triton::attention", mutates_args=())
def attention(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """Self-attention on the packed projection: (N, L, 3D) -> (N, L, D), softmax in fp32."""
    head_dim = _check(qkv, heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    n, length, three_width = qkv.shape
    out = torch.empty(n, length, three_width // 3, dtype=qkv.dtype, device=qkv.device)
    options = launch_options(length, head_dim, qkv.dtype, causal)
    if n > 0:
        grid = (n * heads, triton.cdiv(length, options["BLOCK_M"]))
        with on_device_of(qkv):
            _attention_kernel[grid](
                qkv, out, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
                length, heads, head_dim ** -0.5 * LOG2_E, **options)
    return out


def attention_refusal(qkv, heads):
    """Why :func:`attention` cannot compute this call, or None."""
    return refusal(_check, qkv, heads)


@attention.register_fake
def _(qkv, heads, causal):
    n, length, three_width = qkv.shape
    return qkv.new_empty(n, length, three_width // 3)
