// AVX2+FMA bf16 panel kernel: bf16 pairs widened to fp32 by shifts (the even k is the low half of a
// 32-bit lane, the odd k the high half), fp32 FMA; and the bf16 rounding of activation rows.
#include <utility>

#include "epilogue_avx2.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx2 {
namespace {

COSTEFF_AVX2 inline __m256 even_bf16(__m256i pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
COSTEFF_AVX2 inline __m256 odd_bf16(__m256i pairs) {
  return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
}

template <int MR>
COSTEFF_AVX2 void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                        int64_t ncols, Activation act) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k2 * 2 * kPanel));
    const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k2 * 2 * kPanel + kPanel));
    const __m256 we0 = even_bf16(p0), wo0 = odd_bf16(p0), we1 = even_bf16(p1), wo1 = odd_bf16(p1);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * k2, 4);
      const __m256i xp = _mm256_set1_epi32(pair);
      const __m256 xe = even_bf16(xp), xo = odd_bf16(xp);
      acc[r][0] = _mm256_fmadd_ps(xo, wo0, _mm256_fmadd_ps(xe, we0, acc[r][0]));
      acc[r][1] = _mm256_fmadd_ps(xo, wo1, _mm256_fmadd_ps(xe, we1, acc[r][1]));
    }
  }
  finish_rows<MR>(acc, bias, y, ldy, ncols, act);
}

}  // namespace

void bf16_panel(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  // 4 rows: 8 accumulators + 4 widened weight vectors + 2 widened x fit the 16 ymm registers (6 rows spilled)
  for_row_blocks<4>(rows, [&](auto mr, int64_t r) { block<mr.value>(x + r * ldx, ldx, w, K2, bias, y + r * ldy, ldy, ncols, act); });
}

COSTEFF_AVX2 void prepare_bf16(const float* x, int64_t K, uint16_t* out) {
  const __m256i lsb = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i r[2];
    for (int j = 0; j < 2; ++j) {
      const __m256 v = _mm256_loadu_ps(x + k + 8 * j);
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb))), 16);
      // NaN: keep the high half, quieted (rounding could carry it into Inf)
      const __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
      r[j] = _mm256_blendv_epi8(rounded, nan_bits, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    }
    // packus works per 128-bit lane: [r0 lo, r1 lo, r0 hi, r1 hi] -> fix the order with a permute
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
  }
  for (; k < K; ++k) out[k] = bf16_bits(x[k]);
  if (K % 2) out[K] = 0;
}

}  // namespace costeff::engine::avx2
#endif
