// fastclip::resize_crop_normalize on CUDA, for images decoded on the GPU (nvjpeg): the same
// plan and integer arithmetic as the CPU kernels (resize.h), one thread per output byte of
// each pass, so that the same decoded pixels give the same tensor on either device.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "resize.h"
#include "resize_op.h"

namespace fastclip {
namespace resize {

namespace {

constexpr int kThreads = 256;

struct Weights {  // device pointers into one int32 buffer
  const int32_t *start, *taps, *weights;
  int64_t ksize;
};

struct Geometry {  // what both kernels read of the plan
  int64_t channels, in_row0, in_col0, col0, col1, row0, row1, top, left, out_h, out_w, cols,
      temp_rows;
  bool need_h, need_v, premultiplied;
};

int blocks_for(int64_t count) {
  return static_cast<int>(std::min<int64_t>((count + kThreads - 1) / kThreads, 65535 * 32));
}

// The horizontal pass: temp (N, temp_rows, cols, C) from the image (N, H, W, C), any strides.
__global__ void horizontal_kernel(const uint8_t* __restrict__ image, int64_t sn, int64_t sy,
                                  int64_t sx, int64_t sc, uint8_t* __restrict__ temp,
                                  int64_t batch, Geometry g, Weights h) {
  const int64_t total = batch * g.temp_rows * g.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % g.cols, r = (i / g.cols) % g.temp_rows, n = i / (g.cols * g.temp_rows);
    const uint8_t* row = image + n * sn + (g.in_row0 + r) * sy;
    uint8_t* dst = temp + i * g.channels;
    const int64_t alpha_offset = (g.channels - 1) * sc;
    if (!g.need_h) {
      const uint8_t* px = row + (g.col0 + j) * sx;
      for (int c = 0; c < g.channels; ++c) {
        const bool premultiply_c = g.premultiplied && c < g.channels - 1;
        dst[c] = premultiply_c ? premultiply(px[c * sc], px[alpha_offset]) : px[c * sc];
      }
      continue;
    }
    const int32_t* w = h.weights + j * h.ksize;
    const int64_t first = h.start[j];
    const int taps = h.taps[j];
    for (int c = 0; c < g.channels; ++c) {
      const bool premultiply_c = g.premultiplied && c < g.channels - 1;
      int32_t sum = kHalf;
      for (int t = 0; t < taps; ++t) {
        const uint8_t* px = row + (first + t) * sx;
        const uint32_t value = premultiply_c ? premultiply(px[c * sc], px[alpha_offset])
                                             : px[c * sc];
        sum += static_cast<int32_t>(value) * w[t];
      }
      dst[c] = clip8(sum);
    }
  }
}

// The vertical pass, RGB, and the table into out (N, 3, out_h, out_w), any strides. T is an
// unsigned integer of the output element's size: values are only copied.
template <typename T>
__global__ void vertical_kernel(const uint8_t* __restrict__ temp, const T* __restrict__ table,
                                T* __restrict__ out, int64_t on, int64_t oc, int64_t oy,
                                int64_t ox, int64_t batch, Geometry g, Weights v) {
  const int64_t total = batch * g.out_h * g.out_w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % g.out_w, y = (i / g.out_w) % g.out_h, n = i / (g.out_w * g.out_h);
    const int64_t yy = g.top + y, xx = g.left + x;
    uint32_t rgb[3] = {0, 0, 0};  // the crop's cells outside the image are zero pixels
    if (yy >= g.row0 && yy < g.row1 && xx >= g.col0 && xx < g.col1) {
      const int64_t row_len = g.cols * g.channels;
      const uint8_t* column = temp + n * g.temp_rows * row_len + (xx - g.col0) * g.channels;
      uint32_t px[4];
      for (int c = 0; c < g.channels; ++c) {
        if (g.need_v) {
          const int64_t k = yy - g.row0;
          const int32_t* w = v.weights + k * v.ksize;
          const uint8_t* src = column + (v.start[k] - g.in_row0) * row_len + c;
          int32_t sum = kHalf;
          for (int t = 0; t < v.taps[k]; ++t) sum += static_cast<int32_t>(src[t * row_len]) * w[t];
          px[c] = clip8(sum);
        } else {
          px[c] = column[(yy - g.in_row0) * row_len + c];
        }
      }
      if (g.channels <= 2) {
        rgb[0] = g.premultiplied ? unpremultiply(px[0], px[1]) : px[0];
        rgb[1] = rgb[2] = rgb[0];
      } else {
        for (int c = 0; c < 3; ++c) rgb[c] = g.premultiplied ? unpremultiply(px[c], px[3]) : px[c];
      }
    }
    T* o = out + n * on + y * oy + x * ox;
    for (int c = 0; c < 3; ++c) o[c * oc] = table[c * 256 + rgb[c]];
  }
}

void resize_crop_normalize_cuda(const at::Tensor& image, at::IntArrayRef resized,
                                at::IntArrayRef offset, const at::Tensor& table,
                                const at::Tensor& out, bool vertical_first) {
  check_inputs(image, resized, offset, table, out);
  const c10::cuda::CUDAGuard guard(image.device());
  Oriented o = orient(image, resized, offset, out, vertical_first);
  const at::Tensor& images = o.images;
  const at::Tensor& outs = o.outs;
  const Plan p = make_plan(images.size(1), images.size(2), images.size(3), o.resized[0],
                           o.resized[1], o.offset[0], o.offset[1], outs.size(2), outs.size(3));
  const int64_t batch = images.size(0);
  if (batch * p.out_h * p.out_w == 0) return;  // an empty batch: nothing to launch
  // The weights of both axes in one buffer, copied to the device once.
  std::vector<int32_t> host;
  auto append = [&host](const std::vector<int32_t>& values) {
    const int64_t at = static_cast<int64_t>(host.size());
    host.insert(host.end(), values.begin(), values.end());
    return at;
  };
  const int64_t hs = append(p.h.start), ht = append(p.h.taps), hw = append(p.h.weights);
  const int64_t vs = append(p.v.start), vt = append(p.v.taps), vw = append(p.v.weights);
  host.push_back(0);  // never empty
  // Through pinned memory, without waiting: PyTorch's caching host allocator keeps the
  // pinned buffer until the copy on this stream has run.
  at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  std::memcpy(pinned.data_ptr<int32_t>(), host.data(), host.size() * sizeof(int32_t));
  const at::Tensor weights =
      pinned.to(at::TensorOptions().device(image.device()), /*non_blocking=*/true);
  const int32_t* wd = weights.data_ptr<int32_t>();
  const Weights h{wd + hs, wd + ht, wd + hw, p.h.ksize};
  const Weights v{wd + vs, wd + vt, wd + vw, p.v.ksize};
  const Geometry g{p.channels, p.in_row0, p.in_col0, p.col0, p.col1, p.row0, p.row1, p.top,
                   p.left, p.out_h, p.out_w, p.kept_cols(), p.temp_rows(), p.need_h, p.need_v,
                   p.premultiplied};
  const at::Tensor temp = at::empty({batch, std::max<int64_t>(p.temp_rows(), 1),
                                     std::max<int64_t>(p.kept_cols(), 1), p.channels},
                                    image.options());
  const at::Tensor lut = table.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t temp_count = batch * p.temp_rows() * p.kept_cols();
  if (temp_count > 0) {
    horizontal_kernel<<<blocks_for(temp_count), kThreads, 0, stream>>>(
        images.data_ptr<uint8_t>(), images.stride(0), images.stride(1), images.stride(2),
        images.stride(3), temp.data_ptr<uint8_t>(), batch, g, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t out_count = batch * p.out_h * p.out_w;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    vertical_kernel<T><<<blocks_for(out_count), kThreads, 0, stream>>>(
        temp.data_ptr<uint8_t>(), static_cast<const T*>(lut.data_ptr()),
        static_cast<T*>(outs.data_ptr()), outs.stride(0), outs.stride(1), outs.stride(2),
        outs.stride(3), batch, g, v);
  };
  switch (out.element_size()) {
    case 2: launch(uint16_t{}); break;
    case 4: launch(uint32_t{}); break;
    default: launch(uint64_t{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("resize_crop_normalize", &resize_crop_normalize_cuda);
}

}  // namespace resize
}  // namespace fastclip
