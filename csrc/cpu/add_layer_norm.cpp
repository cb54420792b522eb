// LayerNorm(x + residual) on CPU: one pass adds and gathers Welford statistics per SIMD lane (lanes
// merged with the welford_merge the CUDA kernel uses), a second pass normalizes. Rows run in parallel
// once there is enough work to pay for a fork/join; AVX2+FMA when the CPU has it (see simd.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "shared_rows.h"
#include "costeff/add_layer_norm.h"
#include "costeff/op_checks.h"
#include "costeff/simd.h"

namespace costeff {
namespace {

using Vec = at::vec::Vectorized<float>;

void add_layer_norm_row(
    const float* x, const float* res, const float* gamma, const float* beta, float* out, int64_t n, float eps) {
  constexpr int64_t W = Vec::size();
  const int64_t n_vec = n - n % W;
  // Pass 1: sum into out, per-lane Welford (all lanes share the count, so one reciprocal per step).
  Vec mean(0.f), m2(0.f);
  float steps = 0.f;
  for (int64_t i = 0; i < n_vec; i += W) {
    const Vec v = Vec::loadu(x + i) + Vec::loadu(res + i);
    v.store(out + i);
    steps += 1.f;
    const Vec delta = v - mean;
    mean = at::vec::fmadd(delta, Vec(1.f / steps), mean);
    m2 = at::vec::fmadd(delta, v - mean, m2);
  }
  WelfordState stats = welford_empty();
  if (n_vec > 0) {
    alignas(64) float lane_mean[W];
    alignas(64) float lane_m2[W];
    mean.store(lane_mean);
    m2.store(lane_m2);
    for (int64_t l = 0; l < W; ++l) stats = welford_merge(stats, WelfordState{lane_mean[l], lane_m2[l], steps});
  }
  for (int64_t i = n_vec; i < n; ++i) {
    out[i] = x[i] + res[i];
    stats = welford_add(stats, out[i]);
  }
  const float rstd = layer_norm_rstd(stats, eps);
  // Pass 2: (v - mean) * rstd * gamma + beta  ==  v * (rstd * gamma) + (beta - mean * rstd * gamma)
  const Vec v_mean(stats.mean), v_rstd(rstd);
  for (int64_t i = 0; i < n_vec; i += W) {
    const Vec scale = Vec::loadu(gamma + i) * v_rstd;
    at::vec::fmadd(Vec::loadu(out + i) - v_mean, scale, Vec::loadu(beta + i)).store(out + i);
  }
  for (int64_t i = n_vec; i < n; ++i) out[i] = layer_norm_affine(out[i], stats.mean, rstd, gamma[i], beta[i]);
}

#if COSTEFF_HAVE_AVX2_PATH
// out[i:i+8] = x + res, folded into one 8-lane Welford chain.
COSTEFF_AVX2 inline void welford_step_avx2(
    const float* x, const float* res, float* out, int64_t i, __m256& mean, __m256& m2, __m256 inv_steps) {
  const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(res + i));
  _mm256_storeu_ps(out + i, v);
  const __m256 delta = _mm256_sub_ps(v, mean);
  mean = _mm256_fmadd_ps(delta, inv_steps, mean);
  m2 = _mm256_fmadd_ps(delta, _mm256_sub_ps(v, mean), m2);
}

// The same two passes as add_layer_norm_row with 4 x 8 AVX2 lanes: four independent Welford chains,
// since one chain is bound by its add/FMA latency, not by throughput.
COSTEFF_AVX2 void add_layer_norm_row_avx2(
    const float* x, const float* res, const float* gamma, const float* beta, float* out, int64_t n, float eps) {
  constexpr int kChains = 4;
  const int64_t n_vec = n - n % 8;
  __m256 mean[kChains], m2[kChains];
  float steps[kChains] = {0.f, 0.f, 0.f, 0.f};
  for (int k = 0; k < kChains; ++k) mean[k] = m2[k] = _mm256_setzero_ps();
  int64_t i = 0;
  float full_steps = 0.f;  // all chains step together here: one reciprocal per 32 elements
  for (; i + 8 * kChains <= n_vec; i += 8 * kChains) {
    full_steps += 1.f;
    const __m256 inv = _mm256_set1_ps(1.f / full_steps);
    for (int k = 0; k < kChains; ++k) welford_step_avx2(x, res, out, i + 8 * k, mean[k], m2[k], inv);
  }
  for (int k = 0; k < kChains; ++k) steps[k] = full_steps;
  for (int k = 0; i < n_vec; i += 8, ++k) {
    steps[k] += 1.f;
    welford_step_avx2(x, res, out, i, mean[k], m2[k], _mm256_set1_ps(1.f / steps[k]));
  }
  // Merge the 4 chains lane-wise (welford_merge's formula on 8 lanes; a chain's lanes share one
  // count), then the 8 lanes with welford_merge as a tree: 32 scalar merges with a division each cost
  // more than the vector work of a hidden-256 row.
  for (int width = kChains / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) {
      const float ca = steps[k], cb = steps[k + width], total = ca + cb;
      if (cb == 0.f) continue;
      const __m256 share = _mm256_set1_ps(cb / total);
      const __m256 delta = _mm256_sub_ps(mean[k + width], mean[k]);
      mean[k] = _mm256_fmadd_ps(delta, share, mean[k]);
      m2[k] = _mm256_add_ps(_mm256_add_ps(m2[k], m2[k + width]),
                            _mm256_mul_ps(_mm256_mul_ps(delta, delta), _mm256_mul_ps(_mm256_set1_ps(ca), share)));
      steps[k] = total;
    }
  }
  alignas(32) float lane_mean[8];
  alignas(32) float lane_m2[8];
  _mm256_store_ps(lane_mean, mean[0]);
  _mm256_store_ps(lane_m2, m2[0]);
  WelfordState lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = steps[0] > 0.f ? WelfordState{lane_mean[l], lane_m2[l], steps[0]} : welford_empty();
  for (int width = 4; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] = welford_merge(lanes[l], lanes[l + width]);
  WelfordState stats = lanes[0];
  for (int64_t j = n_vec; j < n; ++j) {
    out[j] = x[j] + res[j];
    stats = welford_add(stats, out[j]);
  }
  const float rstd = layer_norm_rstd(stats, eps);
  const __m256 v_mean = _mm256_set1_ps(stats.mean), v_rstd = _mm256_set1_ps(rstd);
  for (int64_t i = 0; i < n_vec; i += 8) {
    const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(gamma + i), v_rstd);
    _mm256_storeu_ps(
        out + i, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(out + i), v_mean), scale, _mm256_loadu_ps(beta + i)));
  }
  for (int64_t i = n_vec; i < n; ++i) out[i] = layer_norm_affine(out[i], stats.mean, rstd, gamma[i], beta[i]);
}
#endif

}  // namespace

void add_layer_norm_row_cpu(const float* x, const float* res, const float* gamma, const float* beta, float* out,
                            int64_t n, float eps, bool allow_avx2) {
#if COSTEFF_HAVE_AVX2_PATH
  if (allow_avx2 && simd::cpu_has_avx2_fma()) return add_layer_norm_row_avx2(x, res, gamma, beta, out, n, eps);
#endif
  add_layer_norm_row(x, res, gamma, beta, out, n, eps);
}

at::Tensor add_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_add_layer_norm_inputs(x, residual, weight, bias, eps);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "costeff::add_layer_norm (CPU kernel): x must be a CPU tensor");
  const auto out_dtype = x.scalar_type();
  const int64_t n = x.size(-1);
  if (out_dtype == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    return at::layer_norm(x + residual, {n}, weight, bias, eps);
  }
  // fp32 inputs skip the dispatcher round trip of .to(): at batch 1 the op is only a few us.
  auto as_float = [](const at::Tensor& t) { return (t.scalar_type() == at::kFloat ? t : t.to(at::kFloat)).contiguous(); };
  const auto xf = as_float(x);
  const auto rf = as_float(residual);
  const auto gf = as_float(weight);
  const auto bf = as_float(bias);
  auto out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const float* xp = xf.data_ptr<float>();
  const float* rp = rf.data_ptr<float>();
  const float* gp = gf.data_ptr<float>();
  const float* bp = bf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  // ~64k elements (a few us) per task: below that a fork/join costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / n);
#if COSTEFF_HAVE_AVX2_PATH
  if (simd::cpu_has_avx2_fma()) {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        add_layer_norm_row_avx2(xp + r * n, rp + r * n, gp, bp, op + r * n, n, feps);
    });
    return out_dtype == at::kFloat ? out : out.to(out_dtype);
  }
#endif
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) add_layer_norm_row(xp + r * n, rp + r * n, gp, bp, op + r * n, n, feps);
  });
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("add_layer_norm", &add_layer_norm_cpu);
}

}  // namespace costeff
