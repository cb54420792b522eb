#pragma once
// Epilogue pieces shared by the AVX-512 panel kernels: one 16-column panel row is one zmm register.
#include "../avx2/epilogue_avx2.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx512 {

// GELU and tanh run on the two 8-lane halves with the AVX2 approximations, so every ISA computes the
// same activation values.
COSTEFF_AVX512 inline __m512 apply_act(__m512 v, Activation act) {
  if (act == Activation::kNone) return v;
  if (act == Activation::kRelu) return _mm512_max_ps(v, _mm512_setzero_ps());
  const __m256 lo = avx2::apply_act(_mm512_castps512_ps256(v), act);
  const __m256 hi = avx2::apply_act(_mm512_extractf32x8_ps(v, 1), act);
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

COSTEFF_AVX512 inline void store_cols(float* dst, __m512 v, int64_t ncols) {
  if (ncols == kPanel) _mm512_storeu_ps(dst, v);
  else _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << ncols) - 1u), v);
}

// y[r] = act(acc[r] + bias) for MR rows of a 16-column panel (accumulators copied out first, as in
// avx2::finish_rows).
template <int MR>
COSTEFF_AVX512 inline void finish_rows(const __m512 (&acc)[MR], const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  alignas(64) float sums[MR * kPanel];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm512_store_ps(sums + r * kPanel, acc[r]);
  const __m512 b = _mm512_loadu_ps(bias);
  for (int r = 0; r < MR; ++r) store_cols(y + r * ldy, apply_act(_mm512_add_ps(_mm512_load_ps(sums + r * kPanel), b), act), ncols);
}

}  // namespace costeff::engine::avx512
#endif
