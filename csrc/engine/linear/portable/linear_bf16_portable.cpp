// Portable bf16 panel kernel and bf16 row preparation (the reference of the ISA kernels).
#include "../kernels.h"

namespace costeff::engine::portable {

void prepare_bf16(const float* x, int64_t K, uint16_t* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = bf16_bits(x[k]);
  if (K % 2) out[K] = 0;
}

void bf16_panel(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t K2, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    const uint16_t* xr = x + r * ldx;
    for (int64_t k2 = 0; k2 < K2; ++k2)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t j = 0; j < 2; ++j) acc[c] += bf16_to_float(xr[2 * k2 + j]) * bf16_to_float(w[(k2 * kPanel + c) * 2 + j]);
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = activate_scalar(acc[c] + bias[c], act);
  }
}

}  // namespace costeff::engine::portable
