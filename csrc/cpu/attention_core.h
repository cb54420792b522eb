#pragma once
// The attention core shared by the slim_attention op (csrc/cpu/slim_attention.cpp) and the inference
// engine (csrc/engine/run.cpp): masked softmax(q k^T / sqrt(d)) v per (row, head) over given query
// and key rows, on raw pointers (no tensors). Parallel work through at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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
// `nh` heads of size d: head h at column h * d of q (row stride q_stride), k and v (row stride
// kv_stride); ctx is [rows, nh * d]. fp32, call only when simd::cpu_has_avx2_fma(). Parallel over
// (row, head, query block) when the work pays for it.
void attention_core_avx2(const AttentionRows& rows, const float* q_base, int64_t q_stride, const float* k_base,
                         const float* v_base, int64_t kv_stride, float* ctx, int64_t nh, int64_t d);
#endif

// The same in plain loops for any float type (the fallback, and float64 for the op's reference runs).
// A query with no real key gets a zero context.
template <typename T>
void attention_core_portable(const AttentionRows& rows, const T* q_base, int64_t q_stride, const T* k_base, const T* v_base,
                             int64_t kv_stride, T* ctx, int64_t nh, int64_t d) {
  const int64_t inner = nh * d;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  at::parallel_for(0, rows.batch * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(rows.max_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const int64_t n = rows.n_keys[b];
      const int64_t* keys = rows.key_rows + b * rows.max_len;
      const int64_t q0 = rows.q_start != nullptr ? rows.q_start[b] : b * rows.max_len;
      const int64_t q_len = rows.q_len != nullptr ? rows.q_len[b] : rows.max_len;
      for (int64_t i = 0; i < q_len; ++i) {
        T* out = ctx + (q0 + i) * inner + h * d;
        std::fill(out, out + d, T(0));
        if (n == 0) continue;
        const T* q = q_base + (q0 + i) * q_stride + h * d;
        T mx = -std::numeric_limits<T>::infinity();
        for (int64_t t = 0; t < n; ++t) {
          const T* k = k_base + keys[t] * kv_stride + h * d;
          T dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += q[c] * k[c];
          p[t] = dot * scale;
          mx = std::max(mx, p[t]);
        }
        T sum = 0;
        for (int64_t t = 0; t < n; ++t) sum += (p[t] = std::exp(p[t] - mx));
        const T inv = T(1) / sum;
        for (int64_t t = 0; t < n; ++t) {
          const T* v = v_base + keys[t] * kv_stride + h * d;
          const T w = p[t] * inv;
          for (int64_t c = 0; c < d; ++c) out[c] += w * v[c];
        }
      }
    }
  });
}

}  // namespace costeff
