// Portable int8 panel kernel and per-row symmetric quantization (the reference of the ISA kernels).
#include <algorithm>
#include <cmath>

#include "../kernels.h"

namespace costeff::engine::portable {

void quantize(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  *scale = amax / 127.f;
}

void int8_panel(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4, const float* sw,
                const int32_t* /*wsum*/, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t acc[kPanel] = {};
    const int8_t* qr = q + r * ldq;
    for (int64_t k4 = 0; k4 < K4; ++k4)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t j = 0; j < 4; ++j) acc[c] += int32_t(qr[4 * k4 + j]) * int32_t(w[(k4 * kPanel + c) * 4 + j]);
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = activate_scalar(static_cast<float>(acc[c]) * (sx[r] * sw[c]) + bias[c], act);
  }
}

}  // namespace costeff::engine::portable
