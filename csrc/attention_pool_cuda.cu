// fastclip::attention_pool2d on CUDA: the token layout kernel. Everything else is GEMMs, which
// go to cuBLAS through ATen in the driver (attention_pool.cpp), the attend step's included: a
// kernel per (image, head) read each image's tokens once per head. See attention_pool.h for the
// algebra.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_pool.h"

namespace fastclip {

namespace {

constexpr int kTile = 32;      // pool_tokens: channels and positions per shared-memory tile
constexpr int kTileRows = 8;   // pool_tokens: blockDim.y; each thread handles kTile / kTileRows

// One image's channel tile: (C, HW) -> (HW, C) through shared memory, with the positions added
// and the channels' sums over HW kept for the mean token. Grid (N, ceil(C / kTile)), block
// (kTile, kTileRows). Reads are coalesced in either layout: along positions for a contiguous
// map, along channels for channels_last; writes are coalesced along channels.
template <typename scalar_t>
__global__ void pool_tokens_kernel(const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ positions,
                                   scalar_t* __restrict__ tokens, int64_t width, int64_t spatial,
                                   int64_t stride_n, int64_t stride_c, int64_t stride_s,
                                   bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile[kTile][kTile + 1];  // [channel][position]; +1 avoids bank conflicts
  __shared__ acc_t partial[kTileRows][kTile];
  const int64_t n = blockIdx.x, c0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const scalar_t* map = x + n * stride_n;
  scalar_t* out = tokens + n * (spatial + 1) * width;
  const int64_t c = c0 + tx;  // this thread's channel when writing
  acc_t sum = 0;
  for (int64_t s0 = 0; s0 < spatial; s0 += kTile) {
    for (int i = ty; i < kTile; i += kTileRows) {
      const int channel = channels_last ? tx : i, position = channels_last ? i : tx;
      const bool inside = c0 + channel < width && s0 + position < spatial;
      tile[channel][position] = inside ? static_cast<acc_t>(
          map[(c0 + channel) * stride_c + (s0 + position) * stride_s]) : acc_t(0);
    }
    __syncthreads();
    for (int i = ty; i < kTile && s0 + i < spatial; i += kTileRows) {
      if (c < width) {
        const acc_t value = tile[tx][i];
        const int64_t offset = (s0 + i + 1) * width + c;
        sum += value;
        out[offset] = static_cast<scalar_t>(value + static_cast<acc_t>(positions[offset]));
      }
    }
    __syncthreads();
  }
  partial[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < width) {
    acc_t total = 0;
    for (int r = 0; r < kTileRows; ++r) total += partial[r][tx];
    out[c] = static_cast<scalar_t>(total / static_cast<acc_t>(spatial) +
                                   static_cast<acc_t>(positions[c]));
  }
}

at::Tensor pool_tokens_cuda(const at::Tensor& x, const at::Tensor& positions) {
  const int64_t batch = x.size(0), width = x.size(1), spatial = x.size(2) * x.size(3);
  at::Tensor tokens = at::empty({batch, spatial + 1, width}, x.options());
  if (tokens.numel() == 0) return tokens;
  // H and W merge into one position index in both layouts the driver passes (a width of one
  // leaves the stride of W meaningless, so then the stride of H is the step).
  const int64_t stride_s = x.size(3) == 1 ? x.stride(2) : x.stride(3);
  const bool channels_last = x.stride(1) == 1 && width > 1;
  const dim3 grid(batch, (width + kTile - 1) / kTile), block(kTile, kTileRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_tokens", [&] {
    pool_tokens_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), positions.const_data_ptr<scalar_t>(),
        tokens.mutable_data_ptr<scalar_t>(), width, spatial, x.stride(0), x.stride(1),
        stride_s, channels_last);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return tokens;
}

at::Tensor attention_pool2d_cuda(
    const at::Tensor& x, const at::Tensor& positions, const at::Tensor& q_weight,
    const at::Tensor& q_bias, const at::Tensor& k_weight, const at::Tensor& k_bias,
    const at::Tensor& v_weight, const at::Tensor& v_bias, const at::Tensor& c_weight,
    const at::Tensor& c_bias, int64_t heads) {
  static const AttentionPoolKernels kernels{pool_tokens_cuda, attend_batched};
  const c10::cuda::CUDAGuard guard(x.device());
  return attention_pool2d(kernels, x, positions, q_weight, q_bias, k_weight, k_bias, v_weight,
                          v_bias, c_weight, c_bias, heads);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) { m.impl("attention_pool2d", &attention_pool2d_cuda); }

}  // namespace fastclip
