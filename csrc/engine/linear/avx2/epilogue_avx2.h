#pragma once
// Epilogue pieces shared by the AVX2 panel kernels: the activation on 8 lanes and the store of a
// (possibly partial) 16-column panel row.
#include "../kernels.h"
#include "costeff/simd.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx2 {

COSTEFF_AVX2 inline __m256 apply_act(__m256 v, Activation act) {
  if (act == Activation::kGelu) return simd::gelu_ps(v);
  if (act == Activation::kTanh) return simd::tanh_ps(v);
  if (act == Activation::kRelu) return _mm256_max_ps(v, _mm256_setzero_ps());
  return v;
}

COSTEFF_AVX2 inline void store_cols(float* dst, __m256 lo, __m256 hi, int64_t ncols) {
  if (ncols == kPanel) {
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
    return;
  }
  if (ncols >= 8) {
    _mm256_storeu_ps(dst, lo);
    if (ncols > 8) _mm256_maskstore_ps(dst + 8, simd::tail_mask(ncols - 8), hi);
  } else {
    _mm256_maskstore_ps(dst, simd::tail_mask(ncols), lo);
  }
}

// y[r] = act(acc[r] + bias) for MR rows of a 16-column panel. The accumulators are copied out first:
// indexing them in a loop with calls makes GCC keep them in memory and store every accumulator on
// every k of the kernel (measured 2-3x slower).
template <int MR>
COSTEFF_AVX2 inline void finish_rows(const __m256 (&acc)[MR][2], const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  alignas(32) float sums[MR * kPanel];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(sums + r * kPanel, acc[r][0]);
    _mm256_store_ps(sums + r * kPanel + 8, acc[r][1]);
  }
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  for (int r = 0; r < MR; ++r) {
    const __m256 lo = _mm256_add_ps(_mm256_load_ps(sums + r * kPanel), b0);
    const __m256 hi = _mm256_add_ps(_mm256_load_ps(sums + r * kPanel + 8), b1);
    store_cols(y + r * ldy, apply_act(lo, act), apply_act(hi, act), ncols);
  }
}

// Runs block<MR>(row offset r, rows) over `rows` rows in blocks of MR, then the tail with one smaller block.
template <int MR, typename Block>
inline void for_row_blocks(int64_t rows, Block&& block) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) block(std::integral_constant<int, MR>{}, r);
  const int64_t left = rows - r;
  if (left <= 0) return;
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((left == I + 1 ? (block(std::integral_constant<int, I + 1>{}, r), 0) : 0), ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

}  // namespace costeff::engine::avx2
#endif
