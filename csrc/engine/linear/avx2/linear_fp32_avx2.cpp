// AVX2+FMA fp32 panel kernel: MR rows x 16 columns, broadcast x, two 8-lane FMAs per k.
#include <utility>

#include "epilogue_avx2.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx2 {
namespace {

template <int MR>
COSTEFF_AVX2 void block(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy, int64_t ncols,
                        Activation act) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel), w1 = _mm256_loadu_ps(w + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  finish_rows<MR>(acc, bias, y, ldy, ncols, act);
}

}  // namespace

void fp32_panel(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  for_row_blocks<6>(rows, [&](auto mr, int64_t r) { block<mr.value>(x + r * ldx, ldx, w, K, bias, y + r * ldy, ldy, ncols, act); });
}

}  // namespace costeff::engine::avx2
#endif
