// Packing of the engine's linear layers and the loop that hands panels and row chunks to the kernel
// table (see packed_linear.h for the layouts, kernels.h for the kernels).
#include "packed_linear.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace costeff::engine {

Precision parse_precision(const std::string& name) {
  if (name == "fp32" || name == "float32") return Precision::kFloat32;
  if (name == "bf16" || name == "bfloat16") return Precision::kBFloat16;
  if (name == "int8") return Precision::kInt8;
  TORCH_CHECK_VALUE(false, "costeff engine: precision must be 'fp32', 'bf16' or 'int8', got '", name, "'");
}

std::string precision_name(Precision p) {
  switch (p) {
    case Precision::kFloat32: return "fp32";
    case Precision::kBFloat16: return "bf16";
    case Precision::kInt8: return "int8";
  }
  return "?";
}

PackedLinear::PackedLinear(const at::Tensor& weight, const std::optional<at::Tensor>& bias, Precision precision, const std::string& name)
    : precision_(precision) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "costeff engine: ", name, " must be 2-D [out, in], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_floating_point(), "costeff engine: ", name, " must be a float tensor, got ", weight.scalar_type());
  n_ = weight.size(0);
  k_ = weight.size(1);
  const int64_t np = panels() * kPanel;
  const auto w = weight.to(at::kCPU, at::kFloat).contiguous();
  const float* wp = w.data_ptr<float>();
  bias_.assign(np, 0.f);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n_, "costeff engine: the bias of ", name, " must have shape [", n_, "], got ", bias->sizes());
    const auto b = bias->to(at::kCPU, at::kFloat).contiguous();
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + n_, bias_.begin());
  }
  const int64_t P = panels();
  switch (precision_) {
    case Precision::kFloat32: {
      w_f32_.assign(P * k_ * kPanel, 0.f);
      for (int64_t n = 0; n < n_; ++n)
        for (int64_t k = 0; k < k_; ++k) w_f32_[((n / kPanel) * k_ + k) * kPanel + n % kPanel] = wp[n * k_ + k];
      break;
    }
    case Precision::kBFloat16: {
      const int64_t K2 = prepared_stride() / 2;
      w_bf16_.assign(P * K2 * kPanel * 2, 0);
      for (int64_t n = 0; n < n_; ++n)
        for (int64_t k = 0; k < k_; ++k)
          w_bf16_[(((n / kPanel) * K2 + k / 2) * kPanel + n % kPanel) * 2 + k % 2] = bf16_bits(wp[n * k_ + k]);
      break;
    }
    case Precision::kInt8: {
      const int64_t K4 = prepared_stride() / 4;
      w_i8_.assign(P * K4 * kPanel * 4, 0);
      w_scale_.assign(np, 0.f);
      w_sum_.assign(np, 0);
      for (int64_t n = 0; n < n_; ++n) {
        float amax = 0.f;
        for (int64_t k = 0; k < k_; ++k) amax = std::max(amax, std::fabs(wp[n * k_ + k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        w_scale_[n] = amax / 127.f;
        for (int64_t k = 0; k < k_; ++k) {
          const int8_t v = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(wp[n * k_ + k] * inv))));
          w_i8_[(((n / kPanel) * K4 + k / 4) * kPanel + n % kPanel) * 4 + k % 4] = v;
          w_sum_[n] += v;
        }
      }
      break;
    }
  }
}

int64_t PackedLinear::prepared_stride() const {
  switch (precision_) {
    case Precision::kBFloat16: return (k_ + 1) / 2 * 2;
    case Precision::kInt8: return (k_ + 3) / 4 * 4;
    default: return 0;
  }
}

void PackedLinear::prepare_rows(const LinearKernels& kern, const float* x, int64_t ldx, int64_t m0, int64_t m1, uint16_t* bf16, int8_t* q,
                                float* scale) const {
  const int64_t stride = prepared_stride();
  for (int64_t m = m0; m < m1; ++m) {
    if (precision_ == Precision::kBFloat16) kern.prepare_bf16(x + m * ldx, k_, bf16 + m * stride);
    else if (precision_ == Precision::kInt8) kern.quantize(x + m * ldx, k_, stride, q + m * stride, scale + m);
  }
}

void PackedLinear::run(const LinearKernels& kern, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y,
                       int64_t ldy, Activation act) const {
  // Rows in chunks whose activations stay in L2 while every panel passes over them (each panel stays
  // in L1 across the chunk's micro-kernel calls).
  const int64_t row_bytes = precision_ == Precision::kInt8 ? prepared_stride() : precision_ == Precision::kBFloat16 ? 2 * prepared_stride() : 4 * k_;
  const int64_t chunk = std::max<int64_t>(24, (int64_t(192) << 10) / std::max<int64_t>(1, row_bytes) / 24 * 24);
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) run_chunk(kern, in, c0, std::min(m1, c0 + chunk), p0, p1, y, ldy, act);
}

void PackedLinear::run_chunk(const LinearKernels& kern, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y,
                             int64_t ldy, Activation act) const {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * kPanel, ncols = std::min(kPanel, n_ - c0);
    float* yp = y + m0 * ldy + c0;
    const float* bias = bias_.data() + c0;
    switch (precision_) {
      case Precision::kInt8: {
        const int64_t K4 = prepared_stride() / 4;
        kern.int8_panel(in.q + m0 * in.stride, in.stride, in.scale + m0, rows, w_i8_.data() + p * K4 * kPanel * 4, K4, w_scale_.data() + c0,
                        w_sum_.data() + c0, bias, yp, ldy, ncols, act);
        break;
      }
      case Precision::kBFloat16: {
        const int64_t K2 = prepared_stride() / 2;
        kern.bf16_panel(in.bf16 + m0 * in.stride, in.stride, rows, w_bf16_.data() + p * K2 * kPanel * 2, K2, bias, yp, ldy, ncols, act);
        break;
      }
      case Precision::kFloat32:
        kern.fp32_panel(in.f32 + m0 * in.stride, in.stride, rows, w_f32_.data() + p * k_ * kPanel, k_, bias, yp, ldy, ncols, act);
        break;
    }
  }
}

}  // namespace costeff::engine
