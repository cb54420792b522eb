// AVX-512 bf16 panel kernel for CPUs without AVX512-BF16 (Skylake-SP, Ice Lake): bf16 pairs widened
// to fp32 by shifts (even k: low half of a 32-bit lane, odd k: high half), two fp32 FMAs per pair.
#include <cstring>
#include <utility>

#include "epilogue_avx512.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx512 {
namespace {

COSTEFF_AVX512 inline __m512 even_bf16(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
COSTEFF_AVX512 inline __m512 odd_bf16(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}

template <int MR>
COSTEFF_AVX512 void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                          int64_t ncols, Activation act) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const __m512i p = _mm512_loadu_si512(w + k2 * 2 * kPanel);
    const __m512 we = even_bf16(p), wo = odd_bf16(p);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * k2, 4);
      const __m512i xp = _mm512_set1_epi32(pair);
      acc[r] = _mm512_fmadd_ps(odd_bf16(xp), wo, _mm512_fmadd_ps(even_bf16(xp), we, acc[r]));
    }
  }
  finish_rows<MR>(acc, bias, y, ldy, ncols, act);
}

}  // namespace

void bf16_panel(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  avx2::for_row_blocks<8>(rows, [&](auto mr, int64_t r) { block<mr.value>(x + r * ldx, ldx, w, K2, bias, y + r * ldy, ldy, ncols, act); });
}

}  // namespace costeff::engine::avx512
#endif
