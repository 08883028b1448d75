// fastclip::resize_crop_normalize on CUDA, for images decoded on the GPU (nvjpeg): the same
// plan and integer arithmetic as the CPU kernels (resize.h), one thread per output pixel of
// each pass, so that the same decoded pixels give the same tensor on either device. The
// passes' element code and the host code around them are in resize_kernels.h, which the CPU
// op also runs (its "cuda-on-cpu" variant) so that they are tested without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "resize_kernels.h"

namespace fastclip {
namespace resize {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t count) {
  return static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 65535 * 32));
}

// Each pass: a grid-stride loop over its elements (resize_kernels.h).
__global__ void horizontal_kernel(int64_t count, const uint8_t* __restrict__ image, int64_t sn,
                                  int64_t sy, int64_t sx, int64_t sc,
                                  uint8_t* __restrict__ temp, Geometry g, Weights h) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    horizontal_element(i, image, sn, sy, sx, sc, temp, g, h);
}

template <typename T>
__global__ void vertical_kernel(int64_t count, const uint8_t* __restrict__ temp,
                                const T* __restrict__ table, T* __restrict__ out, int64_t on,
                                int64_t oc, int64_t oy, int64_t ox, Geometry g, Weights v) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    vertical_element<T>(i, temp, table, out, on, oc, oy, ox, g, v);
}

// run_kernels on the current stream of the images' device.
struct CudaKernels {
  c10::Device device;
  cudaStream_t stream;

  at::Tensor upload(const std::vector<int32_t>& host) const {
    // Through pinned memory, without waiting: PyTorch's caching host allocator keeps the
    // pinned buffer until the copy on this stream has run.
    at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                  at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    std::memcpy(pinned.data_ptr<int32_t>(), host.data(), host.size() * sizeof(int32_t));
    return pinned.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  }

  void horizontal(int64_t count, const uint8_t* image, int64_t sn, int64_t sy, int64_t sx,
                  int64_t sc, uint8_t* temp, const Geometry& g, const Weights& h) const {
    horizontal_kernel<<<blocks_for(count), kThreads, 0, stream>>>(count, image, sn, sy, sx, sc,
                                                                  temp, g, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void vertical(int64_t count, const uint8_t* temp, const T* table, T* out, int64_t on,
                int64_t oc, int64_t oy, int64_t ox, const Geometry& g, const Weights& v) const {
    vertical_kernel<T><<<blocks_for(count), kThreads, 0, stream>>>(count, temp, table, out, on,
                                                                   oc, oy, ox, g, v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void resize_crop_normalize_cuda(const at::Tensor& image, at::IntArrayRef resized,
                                at::IntArrayRef offset, const at::Tensor& table,
                                const at::Tensor& out, bool vertical_first) {
  check_inputs(image, resized, offset, table, out);
  const c10::cuda::CUDAGuard guard(image.device());
  CudaKernels kernels{image.device(), at::cuda::getCurrentCUDAStream()};
  run_kernels(orient(image, resized, offset, out, vertical_first), table, kernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("resize_crop_normalize", &resize_crop_normalize_cuda);
}

}  // namespace resize
}  // namespace fastclip
