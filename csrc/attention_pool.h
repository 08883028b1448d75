// Attention pooling with a single query: the shared driver and the per-device kernels.
//
// OpenAI's AttentionPool2d lets the mean token attend over all HW+1 tokens. With one query,
// head h's score of token t is q_h . (W_k,h t + b_k,h) = (W_k,h^T q_h) . t + q_h . b_k,h; the
// last term is the same for every token and cancels in the softmax. Since the probabilities
// sum to one, the head's output is W_v,h (sum_t p_t t) + b_v,h. So K and V are never built:
// O(C^2 + heads (HW+1) C) work per image instead of O(HW C^2).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastclip {

// The driver's two device-specific steps.
struct AttentionPoolKernels {
  // (N, C, H, W) map (contiguous or channels_last) and (HW+1, C) positions in the map's dtype
  // -> (N, HW+1, C) contiguous tokens: the mean over HW first, then the HW positions, each
  // plus its positional embedding.
  at::Tensor (*pool_tokens)(const at::Tensor& x, const at::Tensor& positions);
  // tokens (N, L, C) and key_query (heads, N, C), both contiguous -> attended (heads, N, C),
  // any strides: for each image and head, softmax_t(scale * key_query . token_t) and the sum
  // of the tokens weighted by it, in fp32 for fp16, bf16 and fp32 (fp64 for doubles).
  at::Tensor (*attend)(const at::Tensor& tokens, const at::Tensor& key_query, double scale);
};

// The attend step as two batched GEMMs through ATen, on any device.
at::Tensor attend_batched(const at::Tensor& tokens, const at::Tensor& key_query, double scale);

// The op fastclip::attention_pool2d on the device whose kernels are given; checks its inputs.
at::Tensor attention_pool2d(
    const AttentionPoolKernels& kernels, const at::Tensor& x, const at::Tensor& positions,
    const at::Tensor& q_weight, const at::Tensor& q_bias, const at::Tensor& k_weight,
    const at::Tensor& k_bias, const at::Tensor& v_weight, const at::Tensor& v_bias,
    const at::Tensor& c_weight, const at::Tensor& c_bias, int64_t heads);

}  // namespace fastclip
