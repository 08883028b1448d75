// fastclip::resize_crop_normalize: OpenAI's preprocessing of one decoded 8-bit image, as
// Pillow and torchvision compute it, in one op. This header holds what the CPU and CUDA
// kernels share, all of it host code: Pillow's bicubic coefficients and the op's plan.
//
// Pillow (src/libImaging/Resample.c) resizes in two passes, horizontal then vertical, each a
// 1-D filter with fixed-point weights of PRECISION_BITS = 22 bits, accumulated in 32-bit ints
// from a rounding half and clipped to 0..255 after each pass. An output pixel depends only on
// its own row's and column's weights, so computing only the pixels the center crop keeps (and
// only the input rows those need) gives the same bytes as resizing the whole image.
//
// The weights are doubles computed exactly as Pillow computes them: no -ffast-math and no
// contraction into fused multiply-adds (setup.py passes -ffp-contract=off), so that the same
// operations round the same way.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FASTCLIP_HD __host__ __device__
#else
#define FASTCLIP_HD
#endif

namespace fastclip {
namespace resize {

constexpr int kPrecisionBits = 32 - 8 - 2;          // Pillow's PRECISION_BITS
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);  // each sum starts at one half
constexpr double kBicubicSupport = 2.0;

// Pillow's bicubic_filter (Keys' cubic convolution with a = -0.5).
inline double bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// The weights of the outputs [first, first + count) of one axis resized from in_size to
// out_size: Pillow's precompute_coeffs and normalize_coeffs_8bpc, for those outputs only.
struct Axis {
  int64_t ksize = 0;             // weights stored per output (taps beyond `taps` are zero)
  std::vector<int32_t> start;    // first input index of each output
  std::vector<int32_t> taps;     // number of input pixels each output reads
  std::vector<int32_t> weights;  // count * ksize fixed-point weights
};

inline Axis axis_weights(int64_t in_size, int64_t out_size, int64_t first, int64_t count) {
  Axis axis;
  // Pillow passes the box edges as floats: in0 = 0, in1 = in_size.
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / static_cast<int>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kBicubicSupport * filterscale;
  axis.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  axis.start.resize(count);
  axis.taps.resize(count);
  axis.weights.assign(count * axis.ksize, 0);
  std::vector<double> k(axis.ksize);
  for (int64_t j = 0; j < count; ++j) {
    const int xx = static_cast<int>(first + j);
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = static_cast<int>(in_size);
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = bicubic((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    int32_t* out = &axis.weights[j * axis.ksize];
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
      out[x] = k[x] < 0 ? static_cast<int32_t>(-0.5 + k[x] * (1 << kPrecisionBits))
                        : static_cast<int32_t>(0.5 + k[x] * (1 << kPrecisionBits));
    }
    axis.start[j] = xmin;
    axis.taps[j] = xmax;
  }
  return axis;
}

// axis_weights, kept for the last few axes computed on this thread: the images of a job
// share their sizes more often than not, and the weights (doubles, a division per tap) cost
// as much as a tenth of a small image's filtering.
inline Axis cached_axis_weights(int64_t in_size, int64_t out_size, int64_t first,
                                int64_t count) {
  struct Entry {
    int64_t key[4] = {-1, -1, -1, -1};
    Axis axis;
  };
  constexpr int kEntries = 4;
  thread_local Entry cache[kEntries];
  thread_local int next = 0;
  const int64_t key[4] = {in_size, out_size, first, count};
  for (const Entry& entry : cache)
    if (std::equal(key, key + 4, entry.key)) return entry.axis;
  Entry& entry = cache[next];
  next = (next + 1) % kEntries;
  entry.axis = axis_weights(in_size, out_size, first, count);
  std::copy(key, key + 4, entry.key);
  return entry.axis;
}

// Pillow's clip8 after a pass: the sum's integer part, clipped to a byte.
FASTCLIP_HD inline uint8_t clip8(int32_t sum) {
  const int32_t v = sum >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Pillow's MULDIV255 (RGBA -> RGBa, premultiplying a channel by alpha).
FASTCLIP_HD inline uint8_t premultiply(uint32_t value, uint32_t alpha) {
  const uint32_t tmp = value * alpha + 128;
  return static_cast<uint8_t>(((tmp >> 8) + tmp) >> 8);
}

// Pillow's rgba2rgbA (RGBa -> RGBA): the premultiplication undone, clipped.
FASTCLIP_HD inline uint8_t unpremultiply(uint32_t value, uint32_t alpha) {
  if (alpha == 255 || alpha == 0) return static_cast<uint8_t>(value);
  const uint32_t v = (255 * value) / alpha;
  return static_cast<uint8_t>(v > 255 ? 255 : v);
}

// What one image's op computes. Coordinates of the crop are in the resized image; the crop's
// cells outside it are zero pixels (torchvision pads with zeros before cropping).
struct Plan {
  int64_t height = 0, width = 0, channels = 0;   // the input (H, W, C)
  int64_t resized_h = 0, resized_w = 0;          // the resized image
  int64_t top = 0, left = 0, out_h = 0, out_w = 0;  // the crop
  bool resized = false;      // resized_h x resized_w differs from the input: Pillow resizes
  bool alpha = false;        // C is 2 (LA) or 4 (RGBA): the last channel is alpha
  bool premultiplied = false;  // alpha and resized: Pillow resizes with premultiplied alpha
  bool need_h = false, need_v = false;  // Pillow's need_horizontal, need_vertical
  // The crop's rows [row0, row1) and columns [col0, col1) that lie inside the resized image.
  int64_t row0 = 0, row1 = 0, col0 = 0, col1 = 0;
  // The input rows the vertical pass reads (the horizontal pass's output rows) and the input
  // columns the horizontal pass reads.
  int64_t in_row0 = 0, in_row1 = 0, in_col0 = 0, in_col1 = 0;
  Axis h, v;  // weights of the kept columns (need_h) and rows (need_v)

  int64_t kept_rows() const { return row1 - row0; }
  int64_t kept_cols() const { return col1 - col0; }
  int64_t temp_rows() const { return in_row1 - in_row0; }
};

inline Plan make_plan(int64_t height, int64_t width, int64_t channels, int64_t resized_h,
                      int64_t resized_w, int64_t top, int64_t left, int64_t out_h,
                      int64_t out_w) {
  Plan p;
  p.height = height, p.width = width, p.channels = channels;
  p.resized_h = resized_h, p.resized_w = resized_w;
  p.top = top, p.left = left, p.out_h = out_h, p.out_w = out_w;
  p.resized = resized_h != height || resized_w != width;
  p.alpha = channels == 2 || channels == 4;
  p.premultiplied = p.alpha && p.resized;
  p.need_h = resized_w != width;
  p.need_v = resized_h != height;
  p.row0 = std::clamp<int64_t>(top, 0, resized_h);
  p.row1 = std::clamp<int64_t>(top + out_h, 0, resized_h);
  p.col0 = std::clamp<int64_t>(left, 0, resized_w);
  p.col1 = std::clamp<int64_t>(left + out_w, 0, resized_w);
  if (p.kept_rows() <= 0 || p.kept_cols() <= 0) {
    p.row1 = p.row0, p.col1 = p.col0;
    return p;  // nothing of the image is kept: the crop is all padding
  }
  if (p.need_h) {
    p.h = cached_axis_weights(width, resized_w, p.col0, p.kept_cols());
    p.in_col0 = p.h.start.front();
    p.in_col1 = 0;
    for (int64_t j = 0; j < p.kept_cols(); ++j)
      p.in_col1 = std::max<int64_t>(p.in_col1, p.h.start[j] + p.h.taps[j]);
  } else {
    p.in_col0 = p.col0, p.in_col1 = p.col1;
  }
  if (p.need_v) {
    p.v = cached_axis_weights(height, resized_h, p.row0, p.kept_rows());
    p.in_row0 = p.v.start.front();
    p.in_row1 = 0;
    for (int64_t j = 0; j < p.kept_rows(); ++j)
      p.in_row1 = std::max<int64_t>(p.in_row1, p.v.start[j] + p.v.taps[j]);
  } else {
    p.in_row0 = p.row0, p.in_row1 = p.row1;
  }
  return p;
}

}  // namespace resize
}  // namespace fastclip
