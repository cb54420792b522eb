// AVX2 element-wise activation of a run of floats (exit poolers without a dense layer).
#include "epilogue_avx2.h"

#if COSTEFF_HAVE_AVX2_PATH
namespace costeff::engine::avx2 {

COSTEFF_AVX2 void activate(float* x, int64_t n, Activation act) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, apply_act(_mm256_loadu_ps(x + i), act));
  if (i < n) {
    const __m256i m = simd::tail_mask(n - i);
    _mm256_maskstore_ps(x + i, m, apply_act(_mm256_maskload_ps(x + i, m), act));
  }
}

}  // namespace costeff::engine::avx2
#endif
