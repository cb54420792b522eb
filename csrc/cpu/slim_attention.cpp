// Slim attention on CPU for pruned layers: one GEMM for the fused QKV projection, then tasks of
// (batch, head, query block) in parallel: the real keys of the batch row are packed (K transposed,
// V row-major, head size padded to 8) straight from the [tokens, 3 * inner] QKV rows, so there is no
// permute copy and padded keys cost nothing; scores, softmax and P.V run as AVX2 register-blocked
// micro-kernels and the context is written into [tokens, heads * head_size]; one GEMM for the output
// projection. Any head count (0 returns out_bias broadcast) and any head size. float64 and CPUs
// without AVX2 take the portable core. The attention core (attention_core.h) is the engine's too.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "attention_core.h"
#include "costeff/op_checks.h"
#include "costeff/simd.h"

namespace costeff {

at::Tensor slim_attention_cpu(
    const at::Tensor& hidden,
    const at::Tensor& key_padding_mask,
    const at::Tensor& qkv_weight,
    const at::Tensor& qkv_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias,
    int64_t num_heads) {
  const int64_t d =
      check_slim_attention_inputs(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "costeff::slim_attention (CPU kernel): hidden must be a CPU tensor");
  const auto dtype = hidden.scalar_type();
  const int64_t B = hidden.size(0), S = hidden.size(1), H = hidden.size(2);
  const int64_t nh = num_heads, inner = nh * d;
  if (nh == 0 || B * S == 0) {
    auto out = out_bias.expand({B, S, H}).contiguous();
    return out;
  }
  const bool is_double = dtype == at::kDouble;
  const auto compute_dtype = is_double ? at::kDouble : at::kFloat;
  const auto x = hidden.reshape({B * S, H}).to(compute_dtype);
  const auto mask = key_padding_mask.to(at::kBool).contiguous();
  const bool* mask_ptr = mask.data_ptr<bool>();
  const int64_t row_stride = 3 * inner;
#if COSTEFF_HAVE_AVX2_PATH
  if (!is_double && simd::cpu_has_avx2_fma()) {
    std::vector<int64_t> key_pos(B * S), n_keys(B, 0);
    int64_t n_real = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < S; ++j)
        if (mask_ptr[b * S + j]) key_pos[b * S + n_keys[b]++] = j;
      n_real += n_keys[b];
    }
    const auto w = qkv_weight.to(at::kFloat);
    const auto bias = qkv_bias.to(at::kFloat);
    auto context = at::empty({B * S, inner}, x.options());
    std::vector<int64_t> key_rows(B * S);
    if (n_real * 8 <= B * S * 7) {
      // >= 1/8 padding: keys and values only for real tokens (a padded key is never read), queries
      // for every token (padded positions still get an output, as in the reference).
      const auto q = at::addmm(bias.narrow(0, 0, inner), x, w.narrow(0, 0, inner).t());
      auto real_idx = at::empty({n_real}, mask.options().dtype(at::kLong));
      int64_t* idx = real_idx.data_ptr<int64_t>();
      for (int64_t b = 0, r = 0; b < B; ++b)
        for (int64_t t = 0; t < n_keys[b]; ++t, ++r) {
          idx[r] = b * S + key_pos[b * S + t];
          key_rows[b * S + t] = r;
        }
      const auto kv = at::addmm(bias.narrow(0, inner, 2 * inner), x.index_select(0, real_idx),
                                w.narrow(0, inner, 2 * inner).t());  // [n_real, 2*inner]
      const float* kv_ptr = kv.data_ptr<float>();
      attention_core_avx2(AttentionRows{nullptr, nullptr, key_rows.data(), n_keys.data(), B, S}, q.data_ptr<float>(),
                          inner, kv_ptr, kv_ptr + inner, 2 * inner, context.data_ptr<float>(), nh, d);
    } else {
      const auto qkv = at::addmm(bias, x, w.t());  // [B*S, 3*inner]
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < n_keys[b]; ++t) key_rows[b * S + t] = b * S + key_pos[b * S + t];
      const float* p = qkv.data_ptr<float>();
      attention_core_avx2(AttentionRows{nullptr, nullptr, key_rows.data(), n_keys.data(), B, S}, p, row_stride,
                          p + inner, p + 2 * inner, row_stride, context.data_ptr<float>(), nh, d);
    }
    auto out = at::addmm(out_bias.to(at::kFloat), context, out_weight.to(at::kFloat).t()).view({B, S, H});
    return out.scalar_type() == dtype ? out : out.to(dtype);
  }
#endif
  const auto qkv = at::addmm(qkv_bias.to(compute_dtype), x, qkv_weight.to(compute_dtype).t());  // [B*S, 3*inner]
  auto context = at::empty({B * S, inner}, qkv.options());
  std::vector<int64_t> key_rows(B * S), n_keys(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < S; ++j)
      if (mask_ptr[b * S + j]) key_rows[b * S + n_keys[b]++] = b * S + j;
  const AttentionRows rows{nullptr, nullptr, key_rows.data(), n_keys.data(), B, S};
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "slim_attention_cpu", [&] {
    const scalar_t* p = qkv.data_ptr<scalar_t>();
    attention_core_portable<scalar_t>(rows, p, row_stride, p + inner, p + 2 * inner, row_stride, context.data_ptr<scalar_t>(), nh, d);
  });
  auto out = at::addmm(out_bias.to(compute_dtype), context, out_weight.to(compute_dtype).t()).view({B, S, H});
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("slim_attention", &slim_attention_cpu);
}

}  // namespace costeff
