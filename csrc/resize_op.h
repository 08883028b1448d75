// The op fastclip::resize_crop_normalize, as its CPU and CUDA kernels share it.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace fastclip {
namespace resize {

// The image (N, H, W, C) and out (N, 3, H, W) as the horizontal-first passes see them: for
// Pillow's vertical-first order, both transposed, with the sizes and the offset swapped.
struct Oriented {
  at::Tensor images, outs;
  std::array<int64_t, 2> resized, offset;
};
Oriented orient(const at::Tensor& image, at::IntArrayRef resized, at::IntArrayRef offset,
                const at::Tensor& out, bool vertical_first);

// Raises a clear error naming the input that does not fit the op's schema.
void check_inputs(const at::Tensor& image, at::IntArrayRef resized, at::IntArrayRef offset,
                  const at::Tensor& table, const at::Tensor& out);

}  // namespace resize
}  // namespace fastclip
