// AVX512-BF16 panel kernel: vdpbf16ps multiplies a pair of bf16 activations by a pair of bf16 weights
// and adds both exact products into each fp32 lane, one lane per output column.
#include <cstring>
#include <utility>

#include "../avx512/epilogue_avx512.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx512_bf16 {
namespace {

template <int MR>
COSTEFF_AVX512_BF16 void block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                               int64_t ncols, Activation act) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k2 * 2 * kPanel);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * k2, 4);
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), wv);
    }
  }
  avx512::finish_rows<MR>(acc, bias, y, ldy, ncols, act);
}

}  // namespace

void bf16_panel(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  avx2::for_row_blocks<8>(rows, [&](auto mr, int64_t r) { block<mr.value>(x + r * ldx, ldx, w, K2, bias, y + r * ldy, ldy, ncols, act); });
}

}  // namespace costeff::engine::avx512_bf16
#endif
