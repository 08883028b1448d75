// fastclip::attention_pool2d: the op's schema, its device-independent driver and its CPU
// kernels. The CUDA kernels live in attention_pool_cuda.cu. See attention_pool.h for the
// single-query algebra.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "attention_pool.h"

namespace fastclip {

namespace {

constexpr const char* kOp = "fastclip::attention_pool2d";

void check_shape(const at::Tensor& tensor, const char* name, at::IntArrayRef expected,
                 const char* meaning) {
  TORCH_CHECK(tensor.sizes() == expected, kOp, ": ", name, " has shape ", tensor.sizes(),
              " but must be ", meaning, " = ", expected, " for x of shape (N, C, H, W).");
}

void check_like_x(const at::Tensor& tensor, const char* name, const at::Tensor& x) {
  TORCH_CHECK(tensor.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
              tensor.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; convert the weights and the input to one dtype.");
  TORCH_CHECK(tensor.device() == x.device(), kOp, ": ", name, " is on ", tensor.device(),
              " but x is on ", x.device(), "; move them to one device.");
}

void check_inputs(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& q_weight,
                  const at::Tensor& q_bias, const at::Tensor& k_weight, const at::Tensor& k_bias,
                  const at::Tensor& v_weight, const at::Tensor& v_bias,
                  const at::Tensor& c_weight, const at::Tensor& c_bias, int64_t heads) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be a (N, C, H, W) feature map; got shape ",
              x.sizes(), ".");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), kOp, ": x must be floating point; got ",
              x.scalar_type(), ".");
  const int64_t width = x.size(1);
  TORCH_CHECK(heads > 0 && width % heads == 0, kOp, ": heads = ", heads,
              " must be positive and divide the channel count C = ", width, ".");
  check_shape(positions, "positional_embedding", {x.size(2) * x.size(3) + 1, width},
              "(H*W + 1, C)");
  TORCH_CHECK(at::isFloatingType(positions.scalar_type()), kOp,
              ": positional_embedding must be floating point; got ", positions.scalar_type(),
              ".");
  TORCH_CHECK(positions.device() == x.device(), kOp, ": positional_embedding is on ",
              positions.device(), " but x is on ", x.device(), "; move them to one device.");
  check_shape(q_weight, "q_weight", {width, width}, "(C, C)");
  check_shape(k_weight, "k_weight", {width, width}, "(C, C)");
  check_shape(v_weight, "v_weight", {width, width}, "(C, C)");
  check_shape(q_bias, "q_bias", {width}, "(C,)");
  check_shape(k_bias, "k_bias", {width}, "(C,)");
  check_shape(v_bias, "v_bias", {width}, "(C,)");
  TORCH_CHECK(c_weight.dim() == 2 && c_weight.size(1) == width, kOp, ": c_weight has shape ",
              c_weight.sizes(), " but must be (output_dim, C) with C = ", width, ".");
  check_shape(c_bias, "c_bias", {c_weight.size(0)}, "(output_dim,)");
  const std::pair<const at::Tensor*, const char*> parameters[] = {
      {&q_weight, "q_weight"}, {&q_bias, "q_bias"}, {&k_weight, "k_weight"},
      {&k_bias, "k_bias"},     {&v_weight, "v_weight"}, {&v_bias, "v_bias"},
      {&c_weight, "c_weight"}, {&c_bias, "c_bias"}};
  for (const auto& [tensor, name] : parameters) check_like_x(*tensor, name, x);
}

// One image: the transpose (C, HW) -> (HW, C) with the positions added, and the mean over HW,
// in one pass over the map. Strides cover both layouts (channels_last has stride_c == 1).
template <typename scalar_t>
void pool_tokens_image(const scalar_t* x, const scalar_t* positions, scalar_t* tokens,
                       int64_t width, int64_t spatial, int64_t stride_c, int64_t stride_s) {
  using acc_t = at::opmath_type<scalar_t>;
  // A block of channels across all positions stays in L1 while it is transposed.
  constexpr int64_t kBlock = 16;
  acc_t sum[kBlock];
  for (int64_t c0 = 0; c0 < width; c0 += kBlock) {
    const int64_t channels = std::min(kBlock, width - c0);
    std::fill(sum, sum + channels, acc_t(0));
    for (int64_t s = 0; s < spatial; ++s) {
      const scalar_t* pos = positions + (s + 1) * width + c0;
      scalar_t* token = tokens + (s + 1) * width + c0;
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t value = static_cast<acc_t>(x[(c0 + c) * stride_c + s * stride_s]);
        sum[c] += value;
        token[c] = static_cast<scalar_t>(value + static_cast<acc_t>(pos[c]));
      }
    }
    // The mean token is accumulated and shifted in fp32 (fp64 for doubles), then rounded once.
    for (int64_t c = 0; c < channels; ++c) {
      tokens[c0 + c] = static_cast<scalar_t>(sum[c] / static_cast<acc_t>(spatial) +
                                             static_cast<acc_t>(positions[c0 + c]));
    }
  }
}

at::Tensor pool_tokens_cpu(const at::Tensor& x, const at::Tensor& positions) {
  const int64_t batch = x.size(0), width = x.size(1), spatial = x.size(2) * x.size(3);
  at::Tensor tokens = at::empty({batch, spatial + 1, width}, x.options());
  // H and W merge into one position index in both layouts the driver passes (a width of one
  // leaves the stride of W meaningless, so then the stride of H is the step).
  const int64_t stride_n = x.stride(0), stride_c = x.stride(1);
  const int64_t stride_s = x.size(3) == 1 ? x.stride(2) : x.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_tokens", [&] {
    const scalar_t* map = x.const_data_ptr<scalar_t>();
    const scalar_t* pos = positions.const_data_ptr<scalar_t>();
    scalar_t* out = tokens.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        pool_tokens_image(map + n * stride_n, pos, out + n * (spatial + 1) * width, width,
                          spatial, stride_c, stride_s);
      }
    });
  });
  return tokens;
}

at::Tensor attention_pool2d_cpu(
    const at::Tensor& x, const at::Tensor& positions, const at::Tensor& q_weight,
    const at::Tensor& q_bias, const at::Tensor& k_weight, const at::Tensor& k_bias,
    const at::Tensor& v_weight, const at::Tensor& v_bias, const at::Tensor& c_weight,
    const at::Tensor& c_bias, int64_t heads) {
  static const AttentionPoolKernels kernels{pool_tokens_cpu, attend_batched};
  return attention_pool2d(kernels, x, positions, q_weight, q_bias, k_weight, k_bias, v_weight,
                          v_bias, c_weight, c_bias, heads);
}

}  // namespace

at::Tensor attend_batched(const at::Tensor& tokens, const at::Tensor& key_query, double scale) {
  // Two batched matmuls over images, in fp32 (fp64 for doubles). On the CPU they leave the
  // threading to ATen's GEMMs, which keep their speed when other work shares the cores (a
  // parallel_for of small per-image matmuls does not); on CUDA the GEMMs read an image's tokens
  // once for all its heads.
  const at::ScalarType acc_type = at::toOpMathType(tokens.scalar_type());
  const at::Tensor images = tokens.to(acc_type);                     // (N, L, C)
  const at::Tensor queries = key_query.transpose(0, 1).to(acc_type);  // (N, heads, C)
  const at::Tensor probs = at::bmm(queries, images.transpose(1, 2)).mul_(scale).softmax(2);
  return at::bmm(probs, images).to(tokens.scalar_type()).transpose(0, 1);  // (heads, N, C)
}

at::Tensor attention_pool2d(
    const AttentionPoolKernels& kernels, const at::Tensor& x, const at::Tensor& positions,
    const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& k_weight,
    const at::Tensor& k_bias, const at::Tensor& v_weight, const at::Tensor& v_bias,
    const at::Tensor& c_weight, const at::Tensor& c_bias, int64_t heads) {
  check_inputs(x, positions, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, c_weight,
               c_bias, heads);
  const int64_t batch = x.size(0), width = x.size(1), head_dim = width / heads;
  // The kernels handle the two layouts a ResNet produces; anything else is copied once here.
  const bool usual_layout =
      x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor tokens = kernels.pool_tokens(
      usual_layout ? x : x.contiguous(), positions.to(x.scalar_type()).contiguous());
  const at::Tensor query = at::linear(tokens.select(1, 0), q_weight, q_bias);  // (N, C)
  // key_query[h, n] = W_k,h^T q_h. k_bias only shifts every score of a head by the same
  // amount, which the softmax cancels, so it is not read.
  const at::Tensor key_query =
      at::bmm(query.view({batch, heads, head_dim}).transpose(0, 1),
              k_weight.reshape({heads, head_dim, width}));  // (heads, N, C)
  const at::Tensor attended =
      kernels.attend(tokens, key_query, 1.0 / std::sqrt(static_cast<double>(head_dim)));
  // pooled[h, n] = W_v,h attended[h, n] + b_v,h: the head's output, as if V had been built.
  const at::Tensor pooled =
      at::baddbmm(v_bias.reshape({heads, 1, head_dim}), attended,
                  v_weight.reshape({heads, head_dim, width}).transpose(1, 2));  // (heads, N, hd)
  return at::linear(pooled.transpose(0, 1).reshape({batch, width}), c_weight, c_bias);
}

TORCH_LIBRARY(fastclip, m) {
  m.def(
      "attention_pool2d(Tensor x, Tensor pos, Tensor q_w, Tensor q_b, Tensor k_w, Tensor k_b, "
      "Tensor v_w, Tensor v_b, Tensor c_w, Tensor c_b, int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastclip, CPU, m) { m.impl("attention_pool2d", &attention_pool2d_cpu); }

}  // namespace fastclip

// An empty Python module named fastclip._C: importing it loads this library, whose static
// initializers above register the op with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
