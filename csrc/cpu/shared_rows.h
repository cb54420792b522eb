#pragma once
// Shared CPU pieces of the slim ops that the inference engine (csrc/engine/) reuses: the AVX2
// attention core of slim_attention.cpp and the LayerNorm rows of add_layer_norm.cpp.
#include <cstdint>

#include "costeff/simd.h"

namespace costeff {

// Which rows attend to which. Query i (< q_len[b]) of batch row b is token row q_start[b] + i of q and
// ctx (nullptr: b * max_len + i, i < max_len); its keys/values are rows key_rows[b * max_len + t],
// t < n_keys[b], of k and v.
struct AttentionRows {
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* key_rows;
  const int64_t* n_keys;
  int64_t batch;
  int64_t max_len;
};

#if COSTEFF_HAVE_AVX2_PATH
// Masked softmax(q k^T / sqrt(d)) v per (row, head) for `nh` heads of size d: head h at column h * d of
// q (row stride q_stride), k and v (row stride kv_stride); ctx is [rows, nh * d]. Call only when
// simd::cpu_has_avx2_fma(). Parallel over (row, head, query block) when the work pays for it.
void attention_core_avx2(const AttentionRows& rows, const float* q_base, int64_t q_stride, const float* k_base,
                         const float* v_base, int64_t kv_stride, float* ctx, int64_t nh, int64_t d);
#endif

// out = LayerNorm(x + res) of one row of n floats (AVX2 when the CPU has it and `allow_avx2`).
void add_layer_norm_row_cpu(const float* x, const float* res, const float* gamma, const float* beta, float* out,
                            int64_t n, float eps, bool allow_avx2);

}  // namespace costeff
