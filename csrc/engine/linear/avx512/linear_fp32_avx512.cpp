// AVX-512 fp32 panel kernel: MR rows x 16 columns (one zmm per row), x broadcast from memory into FMA.
#include <utility>

#include "epilogue_avx512.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx512 {
namespace {

template <int MR>
COSTEFF_AVX512 void block(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy, int64_t ncols,
                          Activation act) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 wv = _mm512_loadu_ps(w + k * kPanel);
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wv, acc[r]);
  }
  finish_rows<MR>(acc, bias, y, ldy, ncols, act);
}

}  // namespace

void fp32_panel(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  avx2::for_row_blocks<8>(rows, [&](auto mr, int64_t r) { block<mr.value>(x + r * ldx, ldx, w, K, bias, y + r * ldy, ldy, ncols, act); });
}

}  // namespace costeff::engine::avx512
#endif
