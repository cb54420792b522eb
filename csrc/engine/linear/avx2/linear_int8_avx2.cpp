// AVX2 int8 panel kernel: |x| (u8) * sign(w, x) (s8) pairs in 16 bits with vpmaddubsw (every pair sum
// stays within 2 * 127 * 127, so nothing saturates), then pairs of those into 32 bits; one 32-bit lane
// per output column (the 4 k of a quad). And the per-row symmetric quantization.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "epilogue_avx2.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx2 {
namespace {

template <int MR>
COSTEFF_AVX2 void block(const int8_t* q, int64_t ldq, const float* sx, const int8_t* w, int64_t K4, const float* sw, const float* bias,
                        float* y, int64_t ldy, int64_t ncols, Activation act) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k4 * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k4 * 64 + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + 4 * k4, 4);
      const __m256i xv = _mm256_set1_epi32(quad);
      const __m256i ax = _mm256_abs_epi8(xv);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)), ones));
    }
  }
  alignas(32) int32_t sums[MR * kPanel];  // copied out first, see finish_rows
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + r * kPanel), acc[r][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + r * kPanel + 8), acc[r][1]);
  }
  const __m256 s0 = _mm256_loadu_ps(sw), s1 = _mm256_loadu_ps(sw + 8);
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  for (int r = 0; r < MR; ++r) {
    const __m256 sr = _mm256_set1_ps(sx[r]);
    const __m256i a0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums + r * kPanel));
    const __m256i a1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums + r * kPanel + 8));
    const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(sr, s0), b0);
    const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(sr, s1), b1);
    store_cols(y + r * ldy, apply_act(lo, act), apply_act(hi, act), ncols);
  }
}

}  // namespace

void int8_panel(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4, const float* sw,
                const int32_t* /*wsum*/, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  for_row_blocks<4>(rows, [&](auto mr, int64_t r) { block<mr.value>(q + r * ldq, ldq, sx + r, w, K4, sw, bias, y + r * ldy, ldy, ncols, act); });
}

COSTEFF_AVX2 void quantize(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
  float amax = simd::hmax(vmax);
  for (int64_t j = k; j < K; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv));
    const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(packed, order));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  for (; k < Kp; ++k) q[k] = 0;
  *scale = amax / 127.f;
}

}  // namespace costeff::engine::avx2
#endif
