// fastclip::resize_crop_normalize: the op's schema, its input checks and its CPU kernels (the
// CUDA kernels live in resize_cuda.cu). See resize.h for the arithmetic and the plan.
//
// The CPU kernels are plain loops over fixed lane counts, compiled three times: for AVX-512,
// for AVX2 and for any x86-64 (or any other CPU), and chosen at run time by what the CPU
// supports. In the AVX-512 and AVX2 builds the filters' sums, the block transposes and (for
// AVX-512) the fp32 table lookups are intrinsics. Everything is integer arithmetic or a
// copy, so the three give the same bytes (tests/test_preprocess_op.py compares them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <string>

#include "resize.h"
#include "resize_kernels.h"
#include "resize_op.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define FASTCLIP_X86 1
#define FASTCLIP_TARGET(isa) __attribute__((target(isa)))
#else
#define FASTCLIP_X86 0
#define FASTCLIP_TARGET(isa)
#endif
#if defined(__GNUC__)
#define FASTCLIP_INLINE inline __attribute__((always_inline))
#else
#define FASTCLIP_INLINE inline
#endif

namespace fastclip {
namespace resize {

namespace {

constexpr const char* kOp = "fastclip::resize_crop_normalize";

struct Pixels {  // one image's bytes: pixel (y, x) channel c at data + y*sy + x*sx + c*sc
  const uint8_t* data;
  int64_t sy, sx, sc;
};

template <int C>
FASTCLIP_INLINE void load_pixel(const uint8_t* px, int64_t sc, bool premultiplied,
                                uint8_t* dst) {
  if constexpr (C == 2 || C == 4) {
    if (premultiplied) {
      const uint32_t alpha = px[(C - 1) * sc];
      for (int c = 0; c < C - 1; ++c) dst[c] = premultiply(px[c * sc], alpha);
      dst[C - 1] = static_cast<uint8_t>(alpha);
      return;
    }
  }
  if (sc == 1) {
    std::memcpy(dst, px, C);
  } else {
    for (int c = 0; c < C; ++c) dst[c] = px[c * sc];
  }
}

// The instruction set a kernel is compiled for: the plain loops are compiled for each, and
// the filters' sums are written with AVX2 or AVX-512 intrinsics where those are there (the
// compilers' own vectorisation of them spills the sums).
enum class Level { kPortable, kAvx2, kAvx512 };

#if FASTCLIP_X86
// One filter's taps over 8 * V byte lanes: lane l sums kHalf + s[t * step + l] * w[t] over
// the taps t, in 32-bit ints, and out[l] is the sum clipped as Pillow's clip8 (shifted, then
// saturated to a byte through the 16-bit packs). The same arithmetic as the plain loops.
// Not forced inline: its callers are compiled for no instruction set of their own.
template <int V>
FASTCLIP_TARGET("avx2")
void filter_avx2(const uint8_t* s, int64_t step, const int32_t* w, int taps, uint8_t* out) {
  static_assert(V % 2 == 0, "lanes come in pairs of vectors");
  __m256i acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm256_set1_epi32(kHalf);
  for (int t = 0; t < taps; ++t, s += step) {
    const __m256i weight = _mm256_set1_epi32(w[t]);
    for (int v = 0; v < V; ++v) {
      const __m256i px = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 8 * v)));
      acc[v] = _mm256_add_epi32(acc[v], _mm256_mullo_epi32(px, weight));
    }
  }
  // The packs work within 128-bit halves: each is followed by the permute that puts the
  // lanes back in order.
  __m256i words[V / 2];
  for (int v = 0; v < V; v += 2)
    words[v / 2] = _mm256_permute4x64_epi64(
        _mm256_packs_epi32(_mm256_srai_epi32(acc[v], kPrecisionBits),
                           _mm256_srai_epi32(acc[v + 1], kPrecisionBits)),
        0xD8);
  int v = 0;
  for (; v + 1 < V / 2; v += 2)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * v),
                        _mm256_permute4x64_epi64(_mm256_packus_epi16(words[v], words[v + 1]),
                                                 0xD8));
  if (v < V / 2)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * v),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(
                         _mm256_packus_epi16(words[v], words[v]), 0xD8)));
}

// filter_avx2 over 16 * V lanes in 512-bit registers.
template <int V>
FASTCLIP_TARGET("avx512f,avx512bw")
void filter_avx512(const uint8_t* s, int64_t step, const int32_t* w, int taps,
                   uint8_t* out) {
  __m512i acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_set1_epi32(kHalf);
  for (int t = 0; t < taps; ++t, s += step) {
    const __m512i weight = _mm512_set1_epi32(w[t]);
    for (int v = 0; v < V; ++v) {
      const __m512i px = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * v)));
      acc[v] = _mm512_add_epi32(acc[v], _mm512_mullo_epi32(px, weight));
    }
  }
  const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(255);
  for (int v = 0; v < V; ++v) {
    const __m512i value = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_srai_epi32(acc[v], kPrecisionBits), zero), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * v), _mm512_cvtepi32_epi8(value));
  }
}
#endif

#if FASTCLIP_X86
// masks[c][v]: the bytes of channel c of 16 RGB pixels (48 bytes) that lie in their 16-byte
// load v, as shuffle indices (-1 elsewhere).
struct RgbMasks {
  alignas(16) int8_t masks[3][3][16];
};

constexpr RgbMasks rgb_masks() {
  RgbMasks m{};
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 3; ++v)
      for (int i = 0; i < 16; ++i)
        m.masks[c][v][i] = (3 * i + c) / 16 == v ? static_cast<int8_t>((3 * i + c) % 16) : -1;
  return m;
}

constexpr RgbMasks kRgbMasks = rgb_masks();

// write_pixels for RGB bytes into fp32 rows (each channel's row contiguous), 16 pixels at a
// time: the bytes of each channel picked out of 48 and looked up in the table by gathers.
// Returns the first pixel left to the plain loop.
FASTCLIP_TARGET("avx512f,avx512bw")
int64_t write_rgb_avx512(const uint8_t* src, const uint32_t* table, uint32_t* o0, uint32_t* o1,
                         uint32_t* o2, int64_t x0, int64_t x1) {
  const auto& masks = kRgbMasks.masks;
  uint32_t* outs[3] = {o0, o1, o2};
  int64_t x = x0;
  for (; x + 16 <= x1; x += 16, src += 48) {
    const __m128i bytes[3] = {_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)),
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32))};
    for (int c = 0; c < 3; ++c) {
      __m128i channel = _mm_setzero_si128();
      for (int v = 0; v < 3; ++v)
        channel = _mm_or_si128(channel, _mm_shuffle_epi8(
            bytes[v], _mm_load_si128(reinterpret_cast<const __m128i*>(masks[c][v]))));
      const __m512i values = _mm512_i32gather_epi32(_mm512_cvtepu8_epi32(channel),
                                                    table + 256 * c, 4);
      _mm512_storeu_si512(outs[c] + x, values);
    }
  }
  return x;
}

// The horizontal pass's block for 16 rows of packed RGB pixels, four pixels at a time:
// column x of out (`column` bytes apart) gets the 3 bytes of pixel x of each row in turn.
// Each row's 4 pixels become 4 words, 4 rows of them are transposed as words, and each
// column's 4 pixels are stored as 16 bytes whose last 4 the next rows' store overwrites (the
// last rows' land in the column's spare bytes, so `column` must be at least 52). Columns
// [0, count) are filled, count a multiple of 4; the loads read 16 bytes from 3 x, so each
// row must hold 3 count + 4 readable bytes.
FASTCLIP_TARGET("avx2")
void transpose_rgb16(const uint8_t* const rows[16], int64_t count, uint8_t* out,
                     int64_t column) {
  const __m128i expand = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  const __m128i compact =
      _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
  for (int64_t x = 0; x < count; x += 4) {
    uint8_t* dst = out + x * column;
    for (int g = 0; g < 4; ++g) {
      __m128i r[4];
      for (int i = 0; i < 4; ++i)
        r[i] = _mm_shuffle_epi8(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * g + i] + 3 * x)),
            expand);
      const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpackhi_epi32(r[0], r[1]);
      const __m128i t2 = _mm_unpacklo_epi32(r[2], r[3]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
      const __m128i k[4] = {_mm_unpacklo_epi64(t0, t2), _mm_unpackhi_epi64(t0, t2),
                            _mm_unpacklo_epi64(t1, t3), _mm_unpackhi_epi64(t1, t3)};
      for (int i = 0; i < 4; ++i)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * column + 12 * g),
                         _mm_shuffle_epi8(k[i], compact));
    }
  }
}
#endif

// Memory for one image's intermediate bytes, kept per thread from one image to the next
// (fresh memory costs a page fault per page, every image). The bytes the kernels read
// without having written them (a row's padding, a block's rows past the image's last) only
// make lanes whose results are dropped, so the old contents do not matter.
inline std::vector<uint8_t>& scratch(int which, int64_t size) {
  thread_local std::vector<uint8_t> buffers[2];
  std::vector<uint8_t>& buffer = buffers[which];
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer;
}

// Lanes of the vertical pass kept in registers across its taps; rows of the horizontal
// pass's output are padded to a multiple of it.
constexpr int64_t kChunk = 32;

inline int64_t padded_row(int64_t row_len) { return (row_len + kChunk - 1) / kChunk * kChunk; }

// The horizontal pass into temp (temp_rows rows of padded_row(kept_cols * C) bytes). Rows are
// filtered 16 at a time from a transposed block [input column][row][channel], so that every
// tap is one multiply-add over 16 * C contiguous lanes.
template <Level L, int C>
FASTCLIP_INLINE void horizontal_pass(const Plan& p, const Pixels& in, uint8_t* temp) {
  const int64_t cols = p.kept_cols(), rows = p.temp_rows();
  const int64_t stride = padded_row(cols * C);
  if (!p.need_h) {  // the columns as they are (premultiplied where Pillow premultiplies)
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = in.data + (p.in_row0 + r) * in.sy + p.col0 * in.sx;
      uint8_t* dst = temp + r * stride;
      if (!p.premultiplied && in.sc == 1 && in.sx == C) {
        std::memcpy(dst, row, cols * C);
      } else {
        for (int64_t j = 0; j < cols; ++j)
          load_pixel<C>(row + j * in.sx, in.sc, p.premultiplied, dst + j * C);
      }
    }
    return;
  }
  // A block column is kLanes bytes and 4 spare, which the copies below may spill into.
  constexpr int kRows = 16, kLanes = kRows * C, kColumn = kLanes + 4;
  const int64_t span = p.in_col1 - p.in_col0, ksize = p.h.ksize;
  std::vector<uint8_t>& block = scratch(1, span * kColumn + 4);
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min<int64_t>(kRows, rows - r0);
    // The block is read along the image's contiguous axis: its rows, or (for the
    // vertical-first order, on the transposed image) its columns. Sizes and strides are
    // copied to locals, which the byte stores cannot alias.
    const int64_t sy = in.sy, sx = in.sx, sc = in.sc;
    const bool premultiplied = p.premultiplied;
    const uint8_t* first = in.data + (p.in_row0 + r0) * sy + p.in_col0 * sx;
    uint8_t* __restrict__ out = block.data();
    if (sx <= sy && sc == 1 && !premultiplied && C == 3 && sx >= 3) {
      // Whole pixels as 4-byte copies, a block column at a time so that the stores run
      // along it: the byte after each pixel is the next row's (or the spare's) and is
      // written again after. The last column is read exactly, since the byte after an
      // image row's last pixel may lie past the image.
      const uint8_t* rows[kRows];
      for (int64_t r = 0; r < kRows; ++r) rows[r] = first + std::min<int64_t>(r, nr - 1) * sy;
      int64_t x = 0;
#if FASTCLIP_X86
      if constexpr (L != Level::kPortable) {
        // Packed pixels: groups of 4 by transposes, as far as the rows' loads stay within
        // each image row (3 more bytes after the group's 12, and one more pixel).
        if (sx == 3) {
          const int64_t readable = p.width - p.in_col0;
          x = std::max<int64_t>(std::min(span - 1, readable - 2), 0) / 4 * 4;
          transpose_rgb16(rows, x, out, kColumn);
        }
      }
#endif
      for (; x + 1 < span; ++x) {
        uint8_t* column = out + x * kColumn;
        const int64_t at = x * sx;
        for (int64_t r = 0; r < nr; ++r) std::memcpy(column + r * C, rows[r] + at, 4);
      }
      uint8_t* column = out + (span - 1) * kColumn;
      for (int64_t r = 0; r < nr; ++r)
        std::memcpy(column + r * C, rows[r] + (span - 1) * sx, C);
    } else if (sx <= sy) {
      for (int64_t r = 0; r < nr; ++r) {
        const uint8_t* row = first + r * sy;
        if (sc == 1 && !premultiplied) {
          for (int64_t x = 0; x < span; ++x)
            std::memcpy(out + x * kColumn + r * C, row + x * sx, C);
        } else {
          for (int64_t x = 0; x < span; ++x)
            load_pixel<C>(row + x * sx, sc, premultiplied, out + x * kColumn + r * C);
        }
      }
    } else {
      for (int64_t x = 0; x < span; ++x) {
        const uint8_t* column = first + x * sx;
        for (int64_t r = 0; r < nr; ++r)
          load_pixel<C>(column + r * sy, sc, premultiplied, out + x * kColumn + r * C);
      }
    }
    const int32_t* starts = p.h.start.data();
    const int32_t* tap_counts = p.h.taps.data();
    const int32_t* all_weights = p.h.weights.data();
    const int64_t in_col0 = p.in_col0;
    for (int64_t j = 0; j < cols; ++j) {
      const uint8_t* src = block.data() + (starts[j] - in_col0) * kColumn;
      const int32_t* weights = all_weights + j * ksize;
      const int taps = tap_counts[j];
      uint8_t packed[kLanes + 1];
#if FASTCLIP_X86
      if constexpr (L == Level::kAvx512) {
        filter_avx512<kLanes / 16>(src, kColumn, weights, taps, packed);
      } else if constexpr (L == Level::kAvx2) {
        filter_avx2<kLanes / 8>(src, kColumn, weights, taps, packed);
      } else
#endif
      {
        int32_t acc[kLanes];
        for (int l = 0; l < kLanes; ++l) acc[l] = kHalf;
        for (int t = 0; t < taps; ++t) {
          const int32_t w = weights[t];
          const uint8_t* s = src + t * kColumn;
          for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<int32_t>(s[l]) * w;
        }
        for (int l = 0; l < kLanes; ++l) packed[l] = clip8(acc[l]);
      }
      uint8_t* dst = temp + r0 * stride + j * C;
      if (C == 3 && j + 1 < cols) {
        // 4-byte copies: the byte after the pixel is the next column's, written next.
        for (int64_t r = 0; r < nr; ++r) std::memcpy(dst + r * stride, packed + r * C, 4);
      } else {
        for (int64_t r = 0; r < nr; ++r) std::memcpy(dst + r * stride, packed + r * C, C);
      }
    }
  }
}

// The vertical pass of one kept row into line, kChunk lanes at a time with the sums in
// registers across the taps. Both rows are padded to a multiple of kChunk.
template <Level L>
FASTCLIP_INLINE void vertical_row(const Plan& p, int64_t j, const uint8_t* __restrict__ temp,
                                  uint8_t* __restrict__ line, int64_t stride) {
  const int32_t* weights = &p.v.weights[j * p.v.ksize];
  const uint8_t* base = temp + (p.v.start[j] - p.in_row0) * stride;
  const int taps = p.v.taps[j];
#if FASTCLIP_X86
  if constexpr (L == Level::kAvx512) {
    for (int64_t i0 = 0; i0 < stride; i0 += kChunk)
      filter_avx512<kChunk / 16>(base + i0, stride, weights, taps, line + i0);
    return;
  } else if constexpr (L == Level::kAvx2) {
    for (int64_t i0 = 0; i0 < stride; i0 += kChunk)
      filter_avx2<kChunk / 8>(base + i0, stride, weights, taps, line + i0);
    return;
  }
#endif
  for (int64_t i0 = 0; i0 < stride; i0 += kChunk) {
    int32_t acc[kChunk];
    for (int l = 0; l < kChunk; ++l) acc[l] = kHalf;
    for (int t = 0; t < taps; ++t) {
      const int32_t w = weights[t];
      const uint8_t* s = base + t * stride + i0;
      for (int l = 0; l < kChunk; ++l) acc[l] += static_cast<int32_t>(s[l]) * w;
    }
    for (int l = 0; l < kChunk; ++l) line[i0 + l] = clip8(acc[l]);
  }
}

// Pixels [x0, x1) of a row of out from the row's bytes (the image's pixel x0 first): each to
// RGB (alpha undone and dropped, grey repeated) and through the table.
template <int C, bool kPremultiplied, typename T>
FASTCLIP_INLINE void write_pixels(const uint8_t* src, const T* table, T* o0, T* o1, T* o2,
                                  int64_t x0, int64_t x1, int64_t step) {
  const T* t0 = table;
  const T* t1 = table + 256;
  const T* t2 = table + 512;
  for (int64_t x = x0; x < x1; ++x, src += C) {
    uint32_t r, g, b;
    if constexpr (C <= 2) {
      r = g = b = kPremultiplied ? unpremultiply(src[0], src[1]) : src[0];
    } else if constexpr (kPremultiplied) {
      r = unpremultiply(src[0], src[3]);
      g = unpremultiply(src[1], src[3]);
      b = unpremultiply(src[2], src[3]);
    } else {
      r = src[0], g = src[1], b = src[2];
    }
    o0[x * step] = t0[r];
    o1[x * step] = t1[g];
    o2[x * step] = t2[b];
  }
}

// The vertical pass, then each kept pixel to RGB and through the table into out
// (3, out_h, out_w); the crop's cells outside the image are zero pixels. T is an unsigned
// integer of the output element's size: values are only copied.
template <Level L, int C, typename T>
FASTCLIP_INLINE void vertical_and_write(const Plan& p, const uint8_t* temp, const T* table,
                                        T* out, const int64_t* so) {
  const int64_t stride = padded_row(p.kept_cols() * C);
  std::vector<uint8_t> line(p.need_v ? stride : 0);
  const T zero[3] = {table[0], table[256], table[512]};
  // Columns [x0, x1) of out show the image; the rest are padding.
  const int64_t x0 = std::clamp<int64_t>(p.col0 - p.left, 0, p.out_w);
  const int64_t x1 = std::clamp<int64_t>(p.col1 - p.left, x0, p.out_w);
  for (int64_t y = 0; y < p.out_h; ++y) {
    const int64_t yy = p.top + y;
    T* o[3] = {out + y * so[1], out + y * so[1] + so[0], out + y * so[1] + 2 * so[0]};
    const bool inside = yy >= p.row0 && yy < p.row1 && x1 > x0;
    for (int c = 0; c < 3; ++c) {
      for (int64_t x = 0; x < (inside ? x0 : p.out_w); ++x) o[c][x * so[2]] = zero[c];
      if (inside)
        for (int64_t x = x1; x < p.out_w; ++x) o[c][x * so[2]] = zero[c];
    }
    if (!inside) continue;
    const uint8_t* src;
    if (p.need_v) {
      vertical_row<L>(p, yy - p.row0, temp, line.data(), stride);
      src = line.data();
    } else {
      src = temp + (yy - p.in_row0) * stride;
    }
    int64_t first = x0;
#if FASTCLIP_X86
    if constexpr (L == Level::kAvx512 && C == 3 && sizeof(T) == 4) {
      if (!p.premultiplied && so[2] == 1)
        first = write_rgb_avx512(src, reinterpret_cast<const uint32_t*>(table),
                                 reinterpret_cast<uint32_t*>(o[0]),
                                 reinterpret_cast<uint32_t*>(o[1]),
                                 reinterpret_cast<uint32_t*>(o[2]), x0, x1);
    }
#endif
    src += (first - x0) * C;
    if (p.premultiplied)
      write_pixels<C, true>(src, table, o[0], o[1], o[2], first, x1, so[2]);
    else
      write_pixels<C, false>(src, table, o[0], o[1], o[2], first, x1, so[2]);
  }
}

template <Level L, int C, typename T>
FASTCLIP_INLINE void run_image(const Plan& p, const Pixels& in, const void* table, void* out,
                               const int64_t* so) {
  const int64_t size = p.temp_rows() * padded_row(p.kept_cols() * C);
  std::vector<uint8_t>& temp = scratch(0, size);
  if (size > 0) horizontal_pass<L, C>(p, in, temp.data());
  vertical_and_write<L, C, T>(p, temp.data(), static_cast<const T*>(table),
                              static_cast<T*>(out), so);
}

template <Level L, typename T>
FASTCLIP_INLINE void run_channels(const Plan& p, const Pixels& in, const void* table,
                                  void* out, const int64_t* so) {
  switch (p.channels) {
    case 1: run_image<L, 1, T>(p, in, table, out, so); break;
    case 2: run_image<L, 2, T>(p, in, table, out, so); break;
    case 3: run_image<L, 3, T>(p, in, table, out, so); break;
    default: run_image<L, 4, T>(p, in, table, out, so); break;
  }
}

template <Level L>
FASTCLIP_INLINE void run_any(const Plan& p, const Pixels& in, const void* table, void* out,
                             const int64_t* so, int64_t element_size) {
  switch (element_size) {
    case 2: run_channels<L, uint16_t>(p, in, table, out, so); break;
    case 4: run_channels<L, uint32_t>(p, in, table, out, so); break;
    default: run_channels<L, uint64_t>(p, in, table, out, so); break;
  }
}

using Runner = void (*)(const Plan&, const Pixels&, const void*, void*, const int64_t*,
                        int64_t);

void run_portable(const Plan& p, const Pixels& in, const void* table, void* out,
                  const int64_t* so, int64_t element_size) {
  run_any<Level::kPortable>(p, in, table, out, so, element_size);
}

#if FASTCLIP_X86
FASTCLIP_TARGET("avx2")
void run_avx2(const Plan& p, const Pixels& in, const void* table, void* out, const int64_t* so,
              int64_t element_size) {
  run_any<Level::kAvx2>(p, in, table, out, so, element_size);
}

FASTCLIP_TARGET("avx512f,avx512bw")
void run_avx512(const Plan& p, const Pixels& in, const void* table, void* out,
                const int64_t* so, int64_t element_size) {
  run_any<Level::kAvx512>(p, in, table, out, so, element_size);
}
#endif

// run_kernels on the host: the CUDA kernels' element code in loops (the "cuda-on-cpu"
// variant, for tests of that code on machines without a GPU).
struct HostKernels {
  at::Tensor upload(const std::vector<int32_t>& host) const {
    at::Tensor values = at::empty({static_cast<int64_t>(host.size())}, at::kInt);
    std::memcpy(values.data_ptr<int32_t>(), host.data(), host.size() * sizeof(int32_t));
    return values;
  }

  void horizontal(int64_t count, const uint8_t* image, int64_t sn, int64_t sy, int64_t sx,
                  int64_t sc, uint8_t* temp, const Geometry& g, const Weights& h) const {
    for (int64_t i = 0; i < count; ++i)
      horizontal_element(i, image, sn, sy, sx, sc, temp, g, h);
  }

  template <typename T>
  void vertical(int64_t count, const uint8_t* temp, const T* table, T* out, int64_t on,
                int64_t oc, int64_t oy, int64_t ox, const Geometry& g, const Weights& v) const {
    for (int64_t i = 0; i < count; ++i)
      vertical_element<T>(i, temp, table, out, on, oc, oy, ox, g, v);
  }
};

struct Isa {
  const char* name;
  Runner run;  // null for "cuda-on-cpu", which runs whole batches (HostKernels)
  bool (*supported)();
};

const Isa kIsas[] = {
#if FASTCLIP_X86
    {"avx512", run_avx512,
     [] { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }},
    {"avx2", run_avx2, [] { return static_cast<bool>(__builtin_cpu_supports("avx2")); }},
#endif
    {"portable", run_portable, [] { return true; }},
    // Last, so never the best: the CUDA kernels' code, for tests.
    {"cuda-on-cpu", nullptr, [] { return true; }},
};

int best_isa() {
  int i = 0;
  while (!kIsas[i].supported()) ++i;
  return i;
}

std::atomic<int> g_isa{best_isa()};

// The instruction set the CPU kernels use; with `use`, switches to it first ("best" picks
// the best the CPU supports). For tests and benchmarks of each compiled variant.
std::string preprocess_isa(std::optional<std::string> use) {
  if (use) {
    int chosen = -1;
    const int count = static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0]));
    if (*use == "best") chosen = best_isa();
    for (int i = 0; i < count && chosen < 0; ++i)
      if (*use == kIsas[i].name) chosen = i;
    std::string known = "best";
    for (int i = 0; i < count; ++i)
      known += std::string(", ") + kIsas[i].name +
               (kIsas[i].run == nullptr ? " (the CUDA kernels' code, single-threaded, for tests)"
                                        : "");
    TORCH_CHECK(chosen >= 0, "fastclip::preprocess_isa: unknown instruction set '", *use,
                "'; this build has ", known, ".");
    TORCH_CHECK(kIsas[chosen].supported(), "fastclip::preprocess_isa: this CPU does not "
                "support ", kIsas[chosen].name, ".");
    g_isa.store(chosen);
  }
  return kIsas[g_isa.load()].name;
}

void resize_crop_normalize_cpu(const at::Tensor& image, at::IntArrayRef resized,
                               at::IntArrayRef offset, const at::Tensor& table,
                               const at::Tensor& out, bool vertical_first) {
  check_inputs(image, resized, offset, table, out);
  Oriented o = orient(image, resized, offset, out, vertical_first);
  const Runner run = kIsas[g_isa.load()].run;
  if (run == nullptr) {
    HostKernels kernels;
    run_kernels(o, table, kernels);
    return;
  }
  const at::Tensor& images = o.images;
  const at::Tensor& outs = o.outs;
  const at::Tensor lut = table.contiguous();
  const Plan plan = make_plan(images.size(1), images.size(2), images.size(3), o.resized[0],
                              o.resized[1], o.offset[0], o.offset[1], outs.size(2),
                              outs.size(3));
  const int64_t element_size = out.element_size();
  const int64_t so[3] = {outs.stride(1), outs.stride(2), outs.stride(3)};
  const auto* base = images.data_ptr<uint8_t>();
  char* out_base = static_cast<char*>(outs.data_ptr());
  at::parallel_for(0, images.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Pixels in{base + n * images.stride(0), images.stride(1), images.stride(2),
                      images.stride(3)};
      run(plan, in, lut.data_ptr(), out_base + n * outs.stride(0) * element_size, so,
          element_size);
    }
  });
}

}  // namespace

Oriented orient(const at::Tensor& image, at::IntArrayRef resized, at::IntArrayRef offset,
                const at::Tensor& out, bool vertical_first) {
  Oriented o;
  o.images = image.dim() == 4 ? image : image.unsqueeze(0);
  o.outs = out.dim() == 4 ? out : out.unsqueeze(0);
  o.resized = {resized[0], resized[1]};
  o.offset = {offset[0], offset[1]};
  if (vertical_first) {  // the horizontal-first passes on the transposed image
    o.images = o.images.transpose(1, 2);
    o.outs = o.outs.transpose(2, 3);
    std::swap(o.resized[0], o.resized[1]);
    std::swap(o.offset[0], o.offset[1]);
  }
  return o;
}

void check_inputs(const at::Tensor& image, at::IntArrayRef resized, at::IntArrayRef offset,
                  const at::Tensor& table, const at::Tensor& out) {
  TORCH_CHECK(image.scalar_type() == at::kByte, kOp, ": image must hold 8-bit pixels (uint8); "
              "got ", image.scalar_type(), ".");
  TORCH_CHECK(image.dim() == 3 || image.dim() == 4, kOp, ": image must be (H, W, C), or "
              "(N, H, W, C) for a batch of one size; got shape ", image.sizes(), ".");
  const int64_t channels = image.size(-1), height = image.size(-3), width = image.size(-2);
  TORCH_CHECK(channels >= 1 && channels <= 4, kOp, ": image has ", channels, " channels (shape ",
              image.sizes(), "); it must be (H, W, C) with C = 1 (L), 2 (LA), 3 (RGB) or 4 "
              "(RGBA). A (C, H, W) image is passed as image.permute(1, 2, 0).");
  TORCH_CHECK(height >= 1 && width >= 1, kOp, ": image has no pixels (shape ", image.sizes(),
              ").");
  TORCH_CHECK(resized.size() == 2 && offset.size() == 2, kOp, ": resized and offset are "
              "(height, width) and (top, left); got ", resized, " and ", offset, ".");
  constexpr int64_t kMaxSide = int64_t{1} << 24;
  TORCH_CHECK(resized[0] >= 1 && resized[1] >= 1, kOp, ": resized size ", resized,
              " must be positive.");
  TORCH_CHECK(height <= kMaxSide && width <= kMaxSide && resized[0] <= kMaxSide &&
                  resized[1] <= kMaxSide,
              kOp, ": sides over ", kMaxSide, " pixels are not supported (image ",
              image.sizes(), ", resized ", resized, ").");
  TORCH_CHECK(std::abs(offset[0]) <= kMaxSide && std::abs(offset[1]) <= kMaxSide, kOp,
              ": offset ", offset, " is out of range.");
  TORCH_CHECK(out.dim() == image.dim(), kOp, ": out must be (3, H, W) for an (H, W, C) image "
              "and (N, 3, H, W) for an (N, H, W, C) batch; got out ", out.sizes(),
              " for image ", image.sizes(), ".");
  TORCH_CHECK(out.size(-3) == 3 && out.size(-2) >= 1 && out.size(-1) >= 1, kOp,
              ": out must have 3 channels first, (3, H, W); got shape ", out.sizes(), ".");
  TORCH_CHECK(image.dim() == 3 || out.size(0) == image.size(0), kOp, ": out holds ",
              out.size(0), " images but the batch has ", image.size(0), ".");
  TORCH_CHECK(out.size(-2) <= kMaxSide && out.size(-1) <= kMaxSide, kOp, ": out ",
              out.sizes(), " is too large.");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              kOp, ": out must be float32, float16, bfloat16 or float64; got ", dtype, ".");
  TORCH_CHECK(table.scalar_type() == dtype && table.dim() == 2 && table.size(0) == 3 &&
                  table.size(1) == 256,
              kOp, ": table must be the (3, 256) normalized values of each byte in out's dtype ",
              dtype, "; got ", table.scalar_type(), " of shape ", table.sizes(), ".");
  TORCH_CHECK(image.device() == out.device() && table.device() == out.device(), kOp,
              ": image (", image.device(), "), table (", table.device(), ") and out (",
              out.device(), ") must be on one device.");
}

TORCH_LIBRARY_FRAGMENT(fastclip, m) {
  m.def("resize_crop_normalize(Tensor image, int[2] resized, int[2] offset, Tensor table, "
        "Tensor(a!) out, bool vertical_first=False) -> ()");
  m.def("preprocess_isa(str? use=None) -> str", &preprocess_isa);
}

TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("resize_crop_normalize", &resize_crop_normalize_cpu);
}

}  // namespace resize
}  // namespace fastclip
