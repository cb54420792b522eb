// The AVX2 attention core (see attention_core.h): tasks of (batch, head, query block); the real keys
// of the batch row are packed (K transposed, V row-major, head size padded to 8) straight from the
// given key/value rows, so padded keys cost nothing; scores, softmax and P.V run as register-blocked
// micro-kernels.
#include "attention_core.h"

namespace costeff {
namespace {

#if COSTEFF_HAVE_AVX2_PATH
namespace avx2 {

constexpr int64_t kRows = 4;  // query rows per micro-kernel call

// s[r][t] = q[r] . kt[:, t] for R rows; q is [R, dp], kt [dp, np] (np a multiple of 8).
template <int R>
COSTEFF_AVX2 void scores_block(const float* q, const float* kt, int64_t dp, int64_t np, float* s) {
  int64_t t = 0;
  for (; t + 16 <= np; t += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dp; ++c) {
      const __m256 k0 = _mm256_loadu_ps(kt + c * np + t), k1 = _mm256_loadu_ps(kt + c * np + t + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q + r * dp + c);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(s + r * np + t, acc[r][0]);
      _mm256_storeu_ps(s + r * np + t + 8, acc[r][1]);
    }
  }
  for (; t < np; t += 8) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < dp; ++c) {
      const __m256 k0 = _mm256_loadu_ps(kt + c * np + t);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + r * dp + c), k0, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(s + r * np + t, acc[r]);
  }
}

// In place: s[0, n) <- exp((s - max) * scale), s[n, np) <- 0; returns 1 / sum.
COSTEFF_AVX2 float softmax_row(float* s, int64_t n, int64_t np, float scale) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + t));
  float m = simd::hmax(mx);
  for (int64_t u = t; u < n; ++u) m = std::max(m, s[u]);
  const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(-m * scale);
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t < np; t += 8) {
    __m256 p = simd::exp_ps(_mm256_fmadd_ps(_mm256_loadu_ps(s + t), vscale, vshift));
    if (t + 8 > n) p = _mm256_and_ps(p, _mm256_castsi256_ps(simd::tail_mask(n - t)));
    sum = _mm256_add_ps(sum, p);
    _mm256_storeu_ps(s + t, p);
  }
  return 1.f / simd::hsum(sum);
}

// out[r][c] = inv[r] * sum_t p[r][t] v[t][c] for R rows, c < d; p is [R, np], v [n, dp].
template <int R>
COSTEFF_AVX2 void context_block(
    const float* p, const float* v, int64_t n, int64_t np, int64_t dp, int64_t d, const float* inv, float* out,
    int64_t out_stride) {
  alignas(32) float tmp[16];
  for (int64_t c0 = 0; c0 < dp; c0 += 16) {
    const bool two = c0 + 16 <= dp;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    if (two) {
      for (int64_t t = 0; t < n; ++t) {
        const __m256 v0 = _mm256_loadu_ps(v + t * dp + c0), v1 = _mm256_loadu_ps(v + t * dp + c0 + 8);
        for (int r = 0; r < R; ++r) {
          const __m256 pv = _mm256_broadcast_ss(p + r * np + t);
          acc[r][0] = _mm256_fmadd_ps(pv, v0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(pv, v1, acc[r][1]);
        }
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const __m256 v0 = _mm256_loadu_ps(v + t * dp + c0);
        for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * np + t), v0, acc[r][0]);
      }
    }
    const int64_t width = std::min<int64_t>(two ? 16 : 8, d - c0);
    if (width <= 0) break;
    for (int r = 0; r < R; ++r) {
      const __m256 sc = _mm256_set1_ps(inv[r]);
      float* dst = out + r * out_stride + c0;
      if (width == 16) {
        _mm256_storeu_ps(dst, _mm256_mul_ps(acc[r][0], sc));
        _mm256_storeu_ps(dst + 8, _mm256_mul_ps(acc[r][1], sc));
      } else {
        _mm256_store_ps(tmp, _mm256_mul_ps(acc[r][0], sc));
        _mm256_store_ps(tmp + 8, _mm256_mul_ps(acc[r][1], sc));
        std::copy(tmp, tmp + width, dst);
      }
    }
  }
}

template <int R>
COSTEFF_AVX2 void rows_kernel(
    const float* q, const float* kt, const float* v, float* s, int64_t n, int64_t np, int64_t dp, int64_t d,
    float scale, float* out, int64_t out_stride) {
  scores_block<R>(q, kt, dp, np, s);
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = softmax_row(s + r * np, n, np, scale);
  context_block<R>(s, v, n, np, dp, d, inv, out, out_stride);
}

}  // namespace avx2
#endif  // COSTEFF_HAVE_AVX2_PATH

}  // namespace

#if COSTEFF_HAVE_AVX2_PATH
void attention_core_avx2(const AttentionRows& rows, const float* q_base, int64_t q_stride, const float* k_base,
                         const float* v_base, int64_t kv_stride, float* ctx, int64_t nh, int64_t d) {
  using namespace avx2;
  const int64_t B = rows.batch, S = rows.max_len;
  const int64_t* key_rows = rows.key_rows;
  const int64_t* n_keys = rows.n_keys;
  const int64_t inner = nh * d;
  const int64_t dp = (d + 7) / 8 * 8, np_max = (S + 7) / 8 * 8;
  const int64_t threads = at::get_num_threads();
  // Enough (batch, head, query block) tasks to keep every thread busy; big blocks otherwise, since
  // each task repacks the keys and values of its (batch, head).
  const int64_t bh = B * nh;
  int64_t q_blocks = bh >= 4 * threads ? 1 : (4 * threads + bh - 1) / bh;
  q_blocks = std::max<int64_t>(1, std::min(q_blocks, (S + 15) / 16));
  const int64_t qb = (S + q_blocks - 1) / q_blocks;
  q_blocks = (S + qb - 1) / qb;
  const int64_t tasks = bh * q_blocks;
  // Below ~256k multiply-adds the fork/join of a parallel region costs more than it saves.
  const int64_t work_per_task = std::max<int64_t>(1, 2 * qb * S * dp);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work_per_task);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(dp * np_max), vv(np_max * dp), qq(kRows * dp), ss(kRows * np_max);
    int64_t packed_bh = -1;
    int64_t n = 0, np = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t cur_bh = task / q_blocks, blk = task % q_blocks;
      const int64_t b = cur_bh / nh, h = cur_bh % nh;
      const int64_t i0 = blk * qb, i1 = std::min(S, i0 + qb);
      if (cur_bh != packed_bh) {
        packed_bh = cur_bh;
        n = n_keys[b];
        np = (n + 7) / 8 * 8;
        const int64_t* kb = key_rows + b * S;
        std::fill(kt.begin(), kt.begin() + dp * np, 0.f);
        for (int64_t t = 0; t < n; ++t) {
          const float* k = k_base + kb[t] * kv_stride + h * d;
          const float* vs = v_base + kb[t] * kv_stride + h * d;
          for (int64_t c = 0; c < d; ++c) kt[c * np + t] = k[c];
          std::copy(vs, vs + d, vv.data() + t * dp);
          std::fill(vv.data() + t * dp + d, vv.data() + (t + 1) * dp, 0.f);
        }
      }
      const int64_t q0 = rows.q_start != nullptr ? rows.q_start[b] : b * S;
      const int64_t i_end = std::min(i1, rows.q_len != nullptr ? rows.q_len[b] : S);
      if (n == 0) {  // no real key: the context is zero
        for (int64_t i = i0; i < i_end; ++i) std::fill_n(ctx + (q0 + i) * inner + h * d, d, 0.f);
        continue;
      }
      for (int64_t i = i0; i < i_end; i += kRows) {
        const int64_t count = std::min(kRows, i_end - i);
        for (int64_t r = 0; r < count; ++r) {
          const float* q = q_base + (q0 + i + r) * q_stride + h * d;
          std::copy(q, q + d, qq.data() + r * dp);
          std::fill(qq.data() + r * dp + d, qq.data() + (r + 1) * dp, 0.f);
        }
        float* out = ctx + (q0 + i) * inner + h * d;
        switch (count) {
          case 4: rows_kernel<4>(qq.data(), kt.data(), vv.data(), ss.data(), n, np, dp, d, scale, out, inner); break;
          case 3: rows_kernel<3>(qq.data(), kt.data(), vv.data(), ss.data(), n, np, dp, d, scale, out, inner); break;
          case 2: rows_kernel<2>(qq.data(), kt.data(), vv.data(), ss.data(), n, np, dp, d, scale, out, inner); break;
          default: rows_kernel<1>(qq.data(), kt.data(), vv.data(), ss.data(), n, np, dp, d, scale, out, inner); break;
        }
      }
    }
  });
}
#endif  // COSTEFF_HAVE_AVX2_PATH

}  // namespace costeff
