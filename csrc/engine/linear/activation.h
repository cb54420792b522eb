#pragma once
// The engine's one activation definition (fused into the linear kernels' epilogues and applied to
// exit poolers) and the bf16 rounding every precision path shares.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace costeff::engine {

enum class Activation { kNone, kGelu, kTanh, kRelu };

// Exact (erf) GELU, as transformers' "gelu".
inline float gelu_scalar(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

inline float activate_scalar(float v, Activation act) {
  switch (act) {
    case Activation::kGelu: return gelu_scalar(v);
    case Activation::kTanh: return std::tanh(v);
    case Activation::kRelu: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

// bf16 round-to-nearest-even of one float, as bits (NaN stays NaN).
inline uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet, never rounded to Inf
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline float round_to_bf16(float x) { return bf16_to_float(bf16_bits(x)); }

}  // namespace costeff::engine
