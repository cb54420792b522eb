// Slim FFN on CPU: GEMM (+bias) -> exact GELU in place (vectorized erf, parallel) -> GEMM (+bias).
// Handles any intermediate size; 0 (a fully pruned FFN) returns out_bias broadcast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

#include "costeff/op_checks.h"

namespace costeff {
namespace {

using Vec = at::vec::Vectorized<float>;

void gelu_erf_inplace(float* data, int64_t n) {
  const Vec half(0.5f), one(1.f), inv_sqrt2(static_cast<float>(M_SQRT1_2));
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec x = Vec::loadu(data + i);
      (x * half * (one + (x * inv_sqrt2).erf())).store(data + i);
    }
    for (; i < end; ++i) data[i] = 0.5f * data[i] * (1.f + std::erf(data[i] * static_cast<float>(M_SQRT1_2)));
  });
}

}  // namespace

at::Tensor slim_ffn_cpu(
    const at::Tensor& hidden,
    const at::Tensor& in_weight,
    const at::Tensor& in_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias) {
  const int64_t inter = check_slim_ffn_inputs(hidden, in_weight, in_bias, out_weight, out_bias);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "costeff::slim_ffn (CPU kernel): hidden must be a CPU tensor");
  const auto dtype = hidden.scalar_type();
  const int64_t H = hidden.size(-1);
  if (dtype == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    return at::linear(at::gelu(at::linear(hidden, in_weight, in_bias)), out_weight, out_bias);
  }
  const int64_t rows = H == 0 ? 0 : hidden.numel() / H;
  const auto b2 = out_bias.to(at::kFloat);
  at::Tensor out;
  if (inter == 0 || rows == 0) {
    out = b2.expand({rows, H}).contiguous();
  } else {
    const auto x = hidden.reshape({rows, H}).to(at::kFloat);
    auto mid = at::addmm(in_bias.to(at::kFloat), x, in_weight.to(at::kFloat).t());
    gelu_erf_inplace(mid.data_ptr<float>(), mid.numel());
    out = at::addmm(b2, mid, out_weight.to(at::kFloat).t());
  }
  out = out.view(hidden.sizes());
  return dtype == at::kFloat ? out : out.to(dtype);
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("slim_ffn", &slim_ffn_cpu);
}

}  // namespace costeff
