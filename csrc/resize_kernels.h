// The CUDA kernels' code (resize_cuda.cu): one element of each pass, as functions that compile
// for the device and for the host, and the host code around them, shared by the device and
// by the CPU op's "cuda-on-cpu" variant, which runs the same element code in loops on the
// host. The tests compare that variant with the CPU kernels on every input they have, so the
// kernels' arithmetic and indexing are tested on any machine; a GPU run adds the launches,
// the copies and the device's own compiler.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "resize.h"
#include "resize_op.h"

namespace fastclip {
namespace resize {

struct Weights {  // pointers into one int32 buffer, on the kernels' device
  const int32_t *start, *taps, *weights;
  int64_t ksize;
};

struct Geometry {  // what both passes read of the plan
  int64_t channels, in_row0, in_col0, col0, col1, row0, row1, top, left, out_h, out_w, cols,
      temp_rows;
  bool need_h, need_v, premultiplied;
};

// Element i of the horizontal pass: pixel i of temp (N, temp_rows, cols, C), all its channels,
// from the image (N, H, W, C) of any strides.
FASTCLIP_HD inline void horizontal_element(int64_t i, const uint8_t* __restrict__ image,
                                           int64_t sn, int64_t sy, int64_t sx, int64_t sc,
                                           uint8_t* __restrict__ temp, const Geometry& g,
                                           const Weights& h) {
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
    return;
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

// Element i of the vertical pass: pixel i of out (N, 3, out_h, out_w) of any strides, its
// vertical sums, RGB and the table. T is an unsigned integer of the output element's size:
// values are only copied.
template <typename T>
FASTCLIP_HD inline void vertical_element(int64_t i, const uint8_t* __restrict__ temp,
                                         const T* __restrict__ table, T* __restrict__ out,
                                         int64_t on, int64_t oc, int64_t oy, int64_t ox,
                                         const Geometry& g, const Weights& v) {
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

// The op on a batch of one size (orient's view of it), on the device of `kernels`:
//   kernels.upload(host) -> an int32 tensor of host's values on the device;
//   kernels.horizontal(count, image, sn, sy, sx, sc, temp, g, h) runs elements [0, count);
//   kernels.template vertical<T>(count, temp, table, out, on, oc, oy, ox, g, v) likewise.
template <class Kernels>
void run_kernels(const Oriented& o, const at::Tensor& table, Kernels& kernels) {
  const at::Tensor& images = o.images;
  const at::Tensor& outs = o.outs;
  const Plan p = make_plan(images.size(1), images.size(2), images.size(3), o.resized[0],
                           o.resized[1], o.offset[0], o.offset[1], outs.size(2), outs.size(3));
  const int64_t batch = images.size(0);
  if (batch * p.out_h * p.out_w == 0) return;  // an empty batch: nothing to run
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
  const at::Tensor weights = kernels.upload(host);
  const int32_t* wd = weights.data_ptr<int32_t>();
  const Weights h{wd + hs, wd + ht, wd + hw, p.h.ksize};
  const Weights v{wd + vs, wd + vt, wd + vw, p.v.ksize};
  const Geometry g{p.channels, p.in_row0, p.in_col0, p.col0, p.col1, p.row0, p.row1, p.top,
                   p.left, p.out_h, p.out_w, p.kept_cols(), p.temp_rows(), p.need_h, p.need_v,
                   p.premultiplied};
  const at::Tensor temp = at::empty({batch, std::max<int64_t>(p.temp_rows(), 1),
                                     std::max<int64_t>(p.kept_cols(), 1), p.channels},
                                    images.options());
  const at::Tensor lut = table.contiguous();
  const int64_t temp_count = batch * p.temp_rows() * p.kept_cols();
  if (temp_count > 0)
    kernels.horizontal(temp_count, images.data_ptr<uint8_t>(), images.stride(0),
                       images.stride(1), images.stride(2), images.stride(3),
                       temp.data_ptr<uint8_t>(), g, h);
  const int64_t out_count = batch * p.out_h * p.out_w;
  auto vertical = [&](auto tag) {
    using T = decltype(tag);
    kernels.template vertical<T>(out_count, temp.data_ptr<uint8_t>(),
                                 static_cast<const T*>(lut.data_ptr()),
                                 static_cast<T*>(outs.data_ptr()), outs.stride(0),
                                 outs.stride(1), outs.stride(2), outs.stride(3), g, v);
  };
  switch (outs.element_size()) {
    case 2: vertical(uint16_t{}); break;
    case 4: vertical(uint32_t{}); break;
    default: vertical(uint64_t{}); break;
  }
}

}  // namespace resize
}  // namespace fastclip
