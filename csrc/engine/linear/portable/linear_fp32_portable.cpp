// Portable fp32 panel kernel: plain loops, the reference the ISA kernels are tested against.
#include "../kernels.h"

namespace costeff::engine::portable {

void fp32_panel(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
                int64_t ncols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    const float* xr = x + r * ldx;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < kPanel; ++c) acc[c] += xr[k] * w[k * kPanel + c];
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = activate_scalar(acc[c] + bias[c], act);
  }
}

void activate(float* x, int64_t n, Activation act) {
  for (int64_t i = 0; i < n; ++i) x[i] = activate_scalar(x[i], act);
}

}  // namespace costeff::engine::portable
