// Slim attention on CPU for pruned layers: one GEMM for the fused QKV projection, then per
// (batch, head) in parallel: scores over real keys only, masked softmax, weighted sum of values,
// written straight into the [tokens, heads * head_size] context; one GEMM for the output projection.
// Any head count (0 returns out_bias broadcast) and any head size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "costeff/op_checks.h"

namespace costeff {
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  T sum = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

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
  const auto qkv = at::addmm(qkv_bias.to(compute_dtype), x, qkv_weight.to(compute_dtype).t());  // [B*S, 3*inner]
  auto context = at::empty({B * S, inner}, qkv.options());
  const auto mask = key_padding_mask.to(at::kBool).contiguous();
  const bool* mask_ptr = mask.data_ptr<bool>();
  const int64_t row_stride = 3 * inner;

  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "slim_attention_cpu", [&] {
    const scalar_t* qkv_ptr = qkv.data_ptr<scalar_t>();
    scalar_t* ctx_ptr = context.data_ptr<scalar_t>();
    const scalar_t scale = scalar_t(1) / std::sqrt(static_cast<scalar_t>(d));
    at::parallel_for(0, B * nh, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> probs(S);
      std::vector<int64_t> keys(S);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / nh, h = bh % nh;
        const scalar_t* base = qkv_ptr + b * S * row_stride;
        int64_t n_keys = 0;
        for (int64_t j = 0; j < S; ++j)
          if (mask_ptr[b * S + j]) keys[n_keys++] = j;
        for (int64_t i = 0; i < S; ++i) {
          scalar_t* ctx = ctx_ptr + (b * S + i) * inner + h * d;
          std::fill(ctx, ctx + d, scalar_t(0));
          if (n_keys == 0) continue;  // no real key: the context is zero
          const scalar_t* q = base + i * row_stride + h * d;
          scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t t = 0; t < n_keys; ++t) {
            const scalar_t* k = base + keys[t] * row_stride + inner + h * d;
            const scalar_t s = dot(q, k, d) * scale;
            probs[t] = s;
            mx = std::max(mx, s);
          }
          scalar_t denom = 0;
          for (int64_t t = 0; t < n_keys; ++t) {
            probs[t] = std::exp(probs[t] - mx);
            denom += probs[t];
          }
          const scalar_t inv = scalar_t(1) / denom;
          for (int64_t t = 0; t < n_keys; ++t) {
            const scalar_t* v = base + keys[t] * row_stride + 2 * inner + h * d;
            axpy(probs[t] * inv, v, ctx, d);
          }
        }
      }
    });
  });
  auto out = at::addmm(out_bias.to(compute_dtype), context, out_weight.to(compute_dtype).t()).view({B, S, H});
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("slim_attention", &slim_attention_cpu);
}

}  // namespace costeff
