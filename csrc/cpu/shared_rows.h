#pragma once
// Shared CPU pieces of the slim ops that the inference engine (csrc/engine/) reuses: the LayerNorm
// rows of add_layer_norm.cpp (the attention core is attention_core.h).
#include <cstdint>

#include "costeff/simd.h"

namespace costeff {

// out = LayerNorm(x + res) of one row of n floats (AVX2 when the CPU has it and `allow_avx2`).
void add_layer_norm_row_cpu(const float* x, const float* res, const float* gamma, const float* beta, float* out,
                            int64_t n, float eps, bool allow_avx2);

}  // namespace costeff
