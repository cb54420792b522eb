#pragma once
// AVX2+FMA helpers for the CPU kernels. The extension is built without -mavx2 (one binary for every
// x86-64), so ATen's Vectorized<float> compiles to its generic SSE2 loops with scalar exp/erf/tanh.
// These functions carry their own target attribute and are only called after cpu_has_avx2_fma().
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define COSTEFF_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define COSTEFF_AVX2 __attribute__((target("avx2,fma")))
// AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen 4), then with VNNI (vpdpbusd) and with BF16 (vdpbf16ps).
#define COSTEFF_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define COSTEFF_AVX512_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define COSTEFF_AVX512_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define COSTEFF_HAVE_AVX2_PATH 0
#endif

namespace costeff {
namespace simd {

inline bool cpu_has_avx2_fma() {
#if COSTEFF_HAVE_AVX2_PATH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512() {
#if COSTEFF_HAVE_AVX2_PATH
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_vnni() {
#if COSTEFF_HAVE_AVX2_PATH
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#if COSTEFF_HAVE_AVX2_PATH
  static const bool ok = cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

#if COSTEFF_HAVE_AVX2_PATH

COSTEFF_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

COSTEFF_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x), Cephes-style: x = n ln2 + r, degree-6 polynomial for e^r (about 2 ulp on [-87, 88]);
// inputs below -87.3 give 0 (softmax weights that small do not matter). NaN stays NaN.
COSTEFF_AVX2 inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));  // min/max return the second operand on NaN
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n through the exponent bits; n = -127 (x near the lower clamp) gives +0.
  __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
  n = _mm256_max_epi32(n, _mm256_setzero_si256());
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

// tanh(x) = sign(x) (1 - e^{-2|x|}) / (1 + e^{-2|x|}); absolute error ~1e-7.
COSTEFF_AVX2 inline __m256 tanh_ps(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256 ax = _mm256_andnot_ps(sign_mask, x);
  const __m256 t = exp_ps(_mm256_mul_ps(ax, _mm256_set1_ps(-2.f)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 y = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
  return _mm256_or_ps(y, _mm256_and_ps(x, sign_mask));
}

// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the formula ATen's vectorized
// erf uses): erf(|x|) = 1 - poly(t) e^{-x^2}, t = 1 / (1 + p |x|), sign restored.
COSTEFF_AVX2 inline __m256 erf_ps(__m256 x) {
  const __m256 sign_mask = _mm256_set1_ps(-0.f);
  const __m256 ax = _mm256_andnot_ps(sign_mask, x);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), ax, one));
  __m256 y = _mm256_set1_ps(1.061405429f);
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-1.453152027f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(1.421413741f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(-0.284496736f));
  y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(0.254829592f));
  y = _mm256_mul_ps(y, t);
  const __m256 e = exp_ps(_mm256_mul_ps(_mm256_xor_ps(ax, sign_mask), ax));
  const __m256 r = _mm256_fnmadd_ps(y, e, one);
  return _mm256_or_ps(r, _mm256_and_ps(x, sign_mask));
}

// Exact (erf) GELU: 0.5 x (1 + erf(x / sqrt(2))).
COSTEFF_AVX2 inline __m256 gelu_ps(__m256 x) {
  const __m256 e = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(e, _mm256_set1_ps(1.f)));
}

// Lanes [0, n) of a partial vector (n in 0..8).
COSTEFF_AVX2 inline __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

COSTEFF_AVX2 inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i + 8 <= n) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    i += 8;
  }
  if (i < n) {
    const __m256i m = tail_mask(n - i);
    acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

#endif  // COSTEFF_HAVE_AVX2_PATH

}  // namespace simd
}  // namespace costeff
