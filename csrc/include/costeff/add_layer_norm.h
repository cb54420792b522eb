#pragma once
// Welford statistics for LayerNorm rows. The CPU kernel keeps one state per SIMD lane and merges
// lanes; the CUDA kernel keeps one per thread and merges across warps: both through welford_merge.
#include <math.h>

#include "costeff/macros.h"

namespace costeff {

struct WelfordState {
  float mean;
  float m2;     // sum of squared deviations from mean
  float count;
};

COSTEFF_HOST_DEVICE WelfordState welford_empty() { return WelfordState{0.f, 0.f, 0.f}; }

COSTEFF_HOST_DEVICE WelfordState welford_merge(WelfordState a, WelfordState b) {
  const float n = a.count + b.count;
  if (n == 0.f) return welford_empty();
  const float delta = b.mean - a.mean;
  const float b_share = b.count / n;
  return WelfordState{a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share, n};
}

COSTEFF_HOST_DEVICE WelfordState welford_add(WelfordState a, float x) {
  const float n = a.count + 1.f;
  const float delta = x - a.mean;
  const float mean = a.mean + delta / n;
  return WelfordState{mean, a.m2 + delta * (x - mean), n};
}

COSTEFF_HOST_DEVICE float layer_norm_rstd(WelfordState s, float eps) {
  const float var = s.count > 0.f ? fmaxf(s.m2 / s.count, 0.f) : 0.f;  // biased, as torch's LayerNorm
  return 1.f / sqrtf(var + eps);
}

COSTEFF_HOST_DEVICE float layer_norm_affine(float x, float mean, float rstd, float weight, float bias) {
  return (x - mean) * rstd * weight + bias;
}

}  // namespace costeff
