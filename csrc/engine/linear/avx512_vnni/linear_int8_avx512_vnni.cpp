// AVX512-VNNI int8 panel kernel: vpdpbusd multiplies unsigned by signed bytes and adds each group of
// four into a 32-bit lane, one lane per output column. Activations are quantized as usual, then
// stored shifted by +128 (unsigned); the kernel takes 128 * (column sum of the weights) back out, so
// the int32 accumulators equal the signed products exactly (the shift, not an activation zero point).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "../avx512/epilogue_avx512.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx512_vnni {
namespace {

template <int MR>
COSTEFF_AVX512_VNNI void block(const int8_t* q, int64_t ldq, const float* sx, const int8_t* w, int64_t K4, const float* sw,
                               const int32_t* wsum, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  __m512i acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const __m512i wv = _mm512_loadu_si512(w + k4 * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + 4 * k4, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(quad), wv);
    }
  }
  alignas(64) int32_t sums[MR * kPanel];  // copied out first, see avx512::finish_rows
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_store_si512(sums + r * kPanel, acc[r]);
  const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(wsum), 7);  // 128 * wsum
  const __m512 s = _mm512_loadu_ps(sw), b = _mm512_loadu_ps(bias);
  for (int r = 0; r < MR; ++r) {
    const __m512i a = _mm512_sub_epi32(_mm512_load_si512(sums + r * kPanel), shift);
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_set1_ps(sx[r]), s), b);
    avx512::store_cols(y + r * ldy, avx512::apply_act(v, act), ncols);
  }
}

}  // namespace

void int8_panel(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4, const float* sw,
                const int32_t* wsum, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  avx2::for_row_blocks<8>(
      rows, [&](auto mr, int64_t r) { block<mr.value>(q + r * ldq, ldq, sx + r, w, K4, sw, wsum, bias, y + r * ldy, ldy, ncols, act); });
}

COSTEFF_AVX512_VNNI void quantize(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  if (k < K) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (K - k)) - 1u), x + k)));
  const float amax = _mm512_reduce_max_ps(vmax);
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i bias = _mm512_set1_epi32(128);
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    // cvtps rounds to nearest even, as nearbyint in the portable quantizer; |x * inv| <= 127.
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv)), bias);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, v);
  }
  for (k = K; k < Kp; ++k) q[k] = static_cast<int8_t>(0x80);  // the shifted 0 (its weights are 0 anyway)
  *scale = amax / 127.f;
}

}  // namespace costeff::engine::avx512_vnni
#endif
