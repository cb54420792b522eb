// Fused exit head on CPU: [pooler dense] -> activation (tanh / ReLU / GELU) -> classifier -> logits, softmax entropy and the
// exit decision, one pass per row. Small heads (the usual 2-3 classes) run as vectorized dot products
// in one loop (parallel only when the work pays for a fork/join); large class counts use an ATen GEMM
// for the logits. AVX2+FMA tanh/dots when the CPU has them (see simd.h); at batch 1 the pooler is a
// hand-written GEMV too, since a GEMM call costs more than the work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "costeff/exit_head.h"
#include "costeff/op_checks.h"
#include "costeff/simd.h"

namespace costeff {
namespace {

using Vec = at::vec::Vectorized<float>;

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void activate_into(const float* src, float* dst, int64_t n, int act) {
  int64_t i = 0;
  if (act == kExitTanh) {
    for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(src + i).tanh().store(dst + i);
  }
  for (; i < n; ++i) dst[i] = exit_activation(src[i], act);
}

at::Tensor activate(const at::Tensor& x, int act) {
  if (act == kExitRelu) return at::relu(x);
  if (act == kExitGelu) return at::gelu(x);
  return at::tanh(x);
}

// Work (multiply-adds) below which the whole head runs as one parallel loop of dot products.
constexpr int64_t kDirectDotMaxWork = int64_t(1) << 21;
// Pooler work (multiply-adds) up to which the pooler runs as serial dot products instead of a GEMM.
constexpr int64_t kPoolerGemvMaxWork = int64_t(1) << 18;

#if COSTEFF_HAVE_AVX2_PATH
COSTEFF_AVX2 inline __m256 activate_ps(__m256 x, int act) {
  if (act == kExitRelu) return _mm256_max_ps(x, _mm256_setzero_ps());
  if (act == kExitGelu) return simd::gelu_ps(x);
  return simd::tanh_ps(x);
}

COSTEFF_AVX2 void activate_into_avx2(const float* src, float* dst, int64_t n, int act) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, activate_ps(_mm256_loadu_ps(src + i), act));
  if (i < n) {
    const __m256i m = simd::tail_mask(n - i);
    _mm256_maskstore_ps(dst + i, m, activate_ps(_mm256_maskload_ps(src + i, m), act));
  }
}
#endif

inline float dot_any(const float* a, const float* b, int64_t n, bool avx2) {
#if COSTEFF_HAVE_AVX2_PATH
  if (avx2) return simd::dot(a, b, n);
#endif
  return dot(a, b, n);
}

inline void activate_any(const float* src, float* dst, int64_t n, int act, bool avx2) {
#if COSTEFF_HAVE_AVX2_PATH
  if (avx2) return activate_into_avx2(src, dst, n, act);
#endif
  activate_into(src, dst, n, act);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(
    const at::Tensor& hidden,
    const std::optional<at::Tensor>& pooler_weight,
    const std::optional<at::Tensor>& pooler_bias,
    const at::Tensor& classifier_weight,
    const at::Tensor& classifier_bias,
    double threshold,
    c10::string_view activation) {
  const ExitHeadSizes sz = check_exit_head_inputs(
      hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation);
  const int act = sz.activation;
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "costeff::exit_head (CPU kernel): hidden must be a CPU tensor");
  const int64_t B = sz.batch, H = sz.hidden, C = sz.classes;
  const auto out_dtype = hidden.scalar_type();
  auto entropy = at::empty({B}, hidden.options().dtype(at::kFloat));
  auto exit_mask = at::empty({B}, hidden.options().dtype(at::kBool));
  if (B == 0) {
    return {at::empty({0, C}, hidden.options()), entropy, exit_mask};
  }
  if (out_dtype == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    auto pre = sz.has_pooler ? at::addmm(*pooler_bias, hidden, pooler_weight->t()) : hidden;
    auto logits64 = at::addmm(classifier_bias, activate(pre, act), classifier_weight.t());
    auto log_p = at::log_softmax(logits64, 1);
    auto ent64 = (-(log_p.exp() * log_p).sum(1)).clamp_min(0);
    auto finite = at::isfinite(logits64).all(1);
    TORCH_CHECK_VALUE(
        finite.all().item<bool>(), "costeff::exit_head: non-finite logits (NaN/Inf) in row ",
        at::logical_not(finite).nonzero()[0][0].item<int64_t>(),
        ": check hidden and the pooler/classifier weights for NaN/Inf");
    return {logits64, ent64, at::lt(ent64, threshold)};
  }
  // fp32 accumulation whatever the input dtype (no copy, and no dispatcher call for .to(), when
  // already fp32 and contiguous).
  auto as_float = [](const at::Tensor& t) { return (t.scalar_type() == at::kFloat ? t : t.to(at::kFloat)).contiguous(); };
  const bool avx2 = simd::cpu_has_avx2_fma();
  auto h = as_float(hidden);
  if (sz.has_pooler) {
    if (avx2 && B * H * H <= kPoolerGemvMaxWork) {
      const auto pw = as_float(*pooler_weight);
      const auto pb = as_float(*pooler_bias);
      auto pre = at::empty({B, H}, h.options());
      const float *hp = h.data_ptr<float>(), *pwp = pw.data_ptr<float>(), *pbp = pb.data_ptr<float>();
      float* prep = pre.data_ptr<float>();
      for (int64_t r = 0; r < B; ++r)
        for (int64_t j = 0; j < H; ++j) prep[r * H + j] = dot_any(pwp + j * H, hp + r * H, H, true) + pbp[j];
      h = pre;
    } else {
      // A bigger pooler dense is a real GEMM: MKL/oneDNN beats hand-written dots.
      h = at::addmm(as_float(*pooler_bias), h, as_float(*pooler_weight).t());
    }
  }
  const auto w = as_float(classifier_weight);
  const auto b = as_float(classifier_bias);
  auto logits = at::empty({B, C}, hidden.options().dtype(at::kFloat));
  const float* h_ptr = h.data_ptr<float>();
  const float* w_ptr = w.data_ptr<float>();
  const float* b_ptr = b.data_ptr<float>();
  float* logit_ptr = logits.data_ptr<float>();
  float* ent_ptr = entropy.data_ptr<float>();
  bool* exit_ptr = exit_mask.data_ptr<bool>();
  const float tau = static_cast<float>(threshold);
  std::atomic<int64_t> first_bad_row{std::numeric_limits<int64_t>::max()};

  auto finish_rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      EntropyState state = entropy_state_empty();
      bool finite = true;
      for (int64_t c = 0; c < C; ++c) {
        const float z = logit_ptr[r * C + c];
        finite = finite && std::isfinite(z);
        state = entropy_state_add(state, z);
      }
      if (!finite) {
        int64_t cur = first_bad_row.load();
        while (r < cur && !first_bad_row.compare_exchange_weak(cur, r)) {
        }
      }
      ent_ptr[r] = entropy_state_finalize(state);
      exit_ptr[r] = exit_decision(ent_ptr[r], tau);
    }
  };

  if (B * C * H <= kDirectDotMaxWork) {
    // the activation costs about as much as 8 multiply-adds per element; ~128k of that per task.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, H * (C + 8)));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      // Stack scratch for the usual hidden sizes: a heap allocation is a visible share of a 3 us call.
      alignas(64) float stack_buf[1024];
      std::vector<float> heap_buf(H > 1024 ? H : 0);
      float* pooled = H > 1024 ? heap_buf.data() : stack_buf;
      for (int64_t r = begin; r < end; ++r) {
        activate_any(h_ptr + r * H, pooled, H, act, avx2);
        for (int64_t c = 0; c < C; ++c) {
          logit_ptr[r * C + c] = dot_any(pooled, w_ptr + c * H, H, avx2) + b_ptr[c];
        }
      }
      finish_rows(begin, end);
    });
  } else {
    at::addmm_out(logits, b, activate(h, act), w.t());
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / C), finish_rows);
  }
  const int64_t bad = first_bad_row.load();
  TORCH_CHECK_VALUE(
      bad == std::numeric_limits<int64_t>::max(), "costeff::exit_head: non-finite logits (NaN/Inf) in row ", bad,
      ": check hidden and the pooler/classifier weights for NaN/Inf");
  return {out_dtype == at::kFloat ? logits : logits.to(out_dtype), entropy, exit_mask};
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("exit_head", &exit_head_cpu);
}

}  // namespace costeff
