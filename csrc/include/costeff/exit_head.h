#pragma once
// Exit-head math shared by the CPU, CUDA and engine code (and exercised on the CPU by the tests).
// Softmax entropy of one row of logits, computed online (one pass, any number of classes).
// State: running max m, s = sum exp(z - m), t = sum (z - m) exp(z - m); H = log(s) - t / s.
// Keeping t relative to m avoids the cancellation of "m - sum(z e^z)/s" for large logits.
#include <math.h>

#include "costeff/macros.h"

namespace costeff {

struct EntropyState {
  float max;
  float sum_exp;
  float sum_shifted_z_exp;
};

COSTEFF_HOST_DEVICE EntropyState entropy_state_empty() { return EntropyState{-INFINITY, 0.f, 0.f}; }

// Combines two partial states (over disjoint sets of logits); either may be empty.
COSTEFF_HOST_DEVICE EntropyState entropy_state_merge(EntropyState a, EntropyState b) {
  if (b.sum_exp == 0.f) return a;
  if (a.sum_exp == 0.f) return b;
  if (b.max > a.max) {
    EntropyState tmp = a;
    a = b;
    b = tmp;
  }
  // a.max >= b.max: move b onto a's reference point.
  const float shift = b.max - a.max;  // <= 0
  const float scale = expf(shift);
  EntropyState out;
  out.max = a.max;
  out.sum_exp = a.sum_exp + b.sum_exp * scale;
  out.sum_shifted_z_exp = a.sum_shifted_z_exp + scale * (b.sum_shifted_z_exp + shift * b.sum_exp);
  return out;
}

COSTEFF_HOST_DEVICE EntropyState entropy_state_add(EntropyState a, float logit) {
  return entropy_state_merge(a, EntropyState{logit, 1.f, 0.f});
}

COSTEFF_HOST_DEVICE float entropy_state_finalize(EntropyState s) {
  if (s.sum_exp == 0.f) return 0.f;
  const float h = logf(s.sum_exp) - s.sum_shifted_z_exp / s.sum_exp;
  return h > 0.f ? h : 0.f;  // rounding can give -1e-8 for a one-hot softmax
}

COSTEFF_HOST_DEVICE bool exit_decision(float entropy, float threshold) { return entropy < threshold; }

// The exit's activation between the (optional) pooler dense and the classifier: BERT's pooler and
// RoBERTa's head use tanh, DistilBERT's head ReLU, ELECTRA's head exact (erf) GELU.
enum ExitActivation : int { kExitTanh = 0, kExitRelu = 1, kExitGelu = 2 };

COSTEFF_HOST_DEVICE float exit_activation(float x, int activation) {
  if (activation == kExitRelu) return x > 0.f ? x : 0.f;
  if (activation == kExitGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  return tanhf(x);
}

}  // namespace costeff
