// Packing and GEMM kernels of the engine's linear layers (see packed_linear.h for the layouts).
#include "packed_linear.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../cpu/simd.h"

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

Isa select_isa() {
  const char* forced = std::getenv("COSTEFF_ENGINE_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string f(forced);
    if (f == "portable") return Isa::kPortable;
    TORCH_CHECK_VALUE(f == "auto" || f == "avx2", "costeff engine: COSTEFF_ENGINE_ISA must be 'auto', 'avx2' or 'portable', got '", f, "'");
    if (f == "avx2") TORCH_CHECK_VALUE(simd::cpu_has_avx2_fma(), "costeff engine: COSTEFF_ENGINE_ISA=avx2 but this CPU has no AVX2+FMA");
  }
  return simd::cpu_has_avx2_fma() ? Isa::kAvx2 : Isa::kPortable;
}

std::string isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "portable"; }

float round_to_bf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

namespace {

inline uint16_t bf16_bits(float x) {
  const float r = round_to_bf16(x);
  uint32_t bits;
  std::memcpy(&bits, &r, 4);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline float gelu_scalar(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

inline float activate(float v, Activation act) {
  switch (act) {
    case Activation::kGelu: return gelu_scalar(v);
    case Activation::kTanh: return std::tanh(v);
    case Activation::kRelu: return v > 0.f ? v : 0.f;
    default: return v;
  }
}

// ---------------------------------------------------------------------------------------------
// Portable kernels: plain loops over one panel, the same math as the AVX2 kernels.

void run_float_portable(const float* x, int64_t ldx, int64_t rows, const float* wf, const uint16_t* wb, int64_t K,
                        const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kPanel] = {};
    const float* xr = x + r * ldx;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xr[k];
      for (int64_t c = 0; c < kPanel; ++c) {
        const float w = wf != nullptr ? wf[k * kPanel + c] : bf16_to_float(wb[k * kPanel + c]);
        acc[c] += xv * w;
      }
    }
    for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = activate(acc[c] + bias[c], act);
  }
}

void run_int8_portable(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4,
                       const float* sw, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    int32_t acc[kPanel] = {};
    const int8_t* qr = q + r * ldq;
    for (int64_t k4 = 0; k4 < K4; ++k4)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t j = 0; j < 4; ++j) acc[c] += int32_t(qr[4 * k4 + j]) * int32_t(w[(k4 * kPanel + c) * 4 + j]);
    for (int64_t c = 0; c < ncols; ++c)
      y[r * ldy + c] = activate(static_cast<float>(acc[c]) * (sx[r] * sw[c]) + bias[c], act);
  }
}

void quantize_row_portable(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  *scale = amax / 127.f;
}

// ---------------------------------------------------------------------------------------------
// AVX2+FMA kernels.

#if COSTEFF_HAVE_AVX2_PATH

COSTEFF_AVX2 inline __m256 apply_act(__m256 v, Activation act) {
  if (act == Activation::kGelu) return simd::gelu_ps(v);
  if (act == Activation::kTanh) return simd::tanh_ps(v);
  if (act == Activation::kRelu) return _mm256_max_ps(v, _mm256_setzero_ps());
  return v;
}

COSTEFF_AVX2 inline void store_cols(float* dst, __m256 lo, __m256 hi, int64_t ncols) {
  if (ncols == kPanel) {
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
    return;
  }
  if (ncols >= 8) {
    _mm256_storeu_ps(dst, lo);
    if (ncols > 8) _mm256_maskstore_ps(dst + 8, simd::tail_mask(ncols - 8), hi);
  } else {
    _mm256_maskstore_ps(dst, simd::tail_mask(ncols), lo);
  }
}

COSTEFF_AVX2 inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// MR rows x 16 columns of one panel, fp32 or bf16 weights, fp32 accumulation.
template <int MR, bool kBf16>
COSTEFF_AVX2 void float_block_avx2(const float* x, int64_t ldx, const float* wf, const uint16_t* wb, int64_t K,
                                   const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0, w1;
    if constexpr (kBf16) {
      w0 = load_bf16x8(wb + k * kPanel);
      w1 = load_bf16x8(wb + k * kPanel + 8);
    } else {
      w0 = _mm256_loadu_ps(wf + k * kPanel);
      w1 = _mm256_loadu_ps(wf + k * kPanel + 8);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  // The epilogue reads a copy: indexing `acc` in a loop with calls makes GCC keep it in memory and
  // store every accumulator on every k (measured 2-3x slower).
  alignas(32) float sums[MR * kPanel];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(sums + r * kPanel, acc[r][0]);
    _mm256_store_ps(sums + r * kPanel + 8, acc[r][1]);
  }
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  for (int r = 0; r < MR; ++r) {
    const __m256 lo = _mm256_add_ps(_mm256_load_ps(sums + r * kPanel), b0);
    const __m256 hi = _mm256_add_ps(_mm256_load_ps(sums + r * kPanel + 8), b1);
    store_cols(y + r * ldy, apply_act(lo, act), apply_act(hi, act), ncols);
  }
}

// MR rows x 16 columns, int8 x int8 -> int32: |x| (u8) * sign(w, x) (s8) pairs in 16 bits, then pairs
// of those into 32 bits; one 32-bit lane per output column (the 4 k of a quad).
template <int MR>
COSTEFF_AVX2 void int8_block_avx2(const int8_t* q, int64_t ldq, const float* sx, const int8_t* w, int64_t K4,
                                  const float* sw, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k4 * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k4 * 64 + 32));
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, q + r * ldq + 4 * k4, 4);
      const __m256i xv = _mm256_set1_epi32(quad);
      const __m256i ax = _mm256_abs_epi8(xv);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)), ones));
    }
  }
  alignas(32) int32_t sums[MR * kPanel];  // see float_block_avx2
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + r * kPanel), acc[r][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + r * kPanel + 8), acc[r][1]);
  }
  const __m256 s0 = _mm256_loadu_ps(sw), s1 = _mm256_loadu_ps(sw + 8);
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  for (int r = 0; r < MR; ++r) {
    const __m256 sr = _mm256_set1_ps(sx[r]);
    const __m256i a0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums + r * kPanel));
    const __m256i a1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(sums + r * kPanel + 8));
    const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(sr, s0), b0);
    const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(sr, s1), b1);
    store_cols(y + r * ldy, apply_act(lo, act), apply_act(hi, act), ncols);
  }
}

COSTEFF_AVX2 void quantize_row_avx2(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
  float amax = simd::hmax(vmax);
  for (int64_t j = k; j < K; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv));
    const __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(packed, order));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inv));
  for (; k < Kp; ++k) q[k] = 0;
  *scale = amax / 127.f;
}

COSTEFF_AVX2 void round_rows_bf16_avx2(const float* x, float* out, int64_t n) {
  const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), keep = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i rounded = _mm256_and_si256(
        _mm256_add_epi32(bits, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(bits, 16), lsb))), keep);
    const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    _mm256_storeu_ps(out + i, _mm256_blendv_ps(_mm256_castsi256_ps(rounded), v, is_nan));
  }
  for (; i < n; ++i) out[i] = round_to_bf16(x[i]);
}

COSTEFF_AVX2 void map_rows_avx2(float* x, int64_t n, Activation act) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, apply_act(_mm256_loadu_ps(x + i), act));
  if (i < n) {
    const __m256i m = simd::tail_mask(n - i);
    _mm256_maskstore_ps(x + i, m, apply_act(_mm256_maskload_ps(x + i, m), act));
  }
}

template <bool kBf16>
void run_float_avx2(const float* x, int64_t ldx, int64_t rows, const float* wf, const uint16_t* wb, int64_t K,
                    const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  constexpr int MR = 6;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) float_block_avx2<MR, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act);
  switch (rows - r) {
    case 5: float_block_avx2<5, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act); break;
    case 4: float_block_avx2<4, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act); break;
    case 3: float_block_avx2<3, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act); break;
    case 2: float_block_avx2<2, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act); break;
    case 1: float_block_avx2<1, kBf16>(x + r * ldx, ldx, wf, wb, K, bias, y + r * ldy, ldy, ncols, act); break;
    default: break;
  }
}

void run_int8_avx2(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4,
                   const float* sw, const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act) {
  constexpr int MR = 4;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) int8_block_avx2<MR>(q + r * ldq, ldq, sx + r, w, K4, sw, bias, y + r * ldy, ldy, ncols, act);
  switch (rows - r) {
    case 3: int8_block_avx2<3>(q + r * ldq, ldq, sx + r, w, K4, sw, bias, y + r * ldy, ldy, ncols, act); break;
    case 2: int8_block_avx2<2>(q + r * ldq, ldq, sx + r, w, K4, sw, bias, y + r * ldy, ldy, ncols, act); break;
    case 1: int8_block_avx2<1>(q + r * ldq, ldq, sx + r, w, K4, sw, bias, y + r * ldy, ldy, ncols, act); break;
    default: break;
  }
}

#endif  // COSTEFF_HAVE_AVX2_PATH

}  // namespace

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
    case Precision::kFloat32:
    case Precision::kBFloat16: {
      const bool bf16 = precision_ == Precision::kBFloat16;
      if (bf16) w_bf16_.assign(P * k_ * kPanel, 0); else w_f32_.assign(P * k_ * kPanel, 0.f);
      for (int64_t n = 0; n < n_; ++n)
        for (int64_t k = 0; k < k_; ++k) {
          const int64_t at = ((n / kPanel) * k_ + k) * kPanel + n % kPanel;
          if (bf16) w_bf16_[at] = bf16_bits(wp[n * k_ + k]); else w_f32_[at] = wp[n * k_ + k];
        }
      break;
    }
    case Precision::kInt8: {
      const int64_t K4 = quantized_stride() / 4;
      w_i8_.assign(P * K4 * kPanel * 4, 0);
      w_scale_.assign(np, 0.f);
      for (int64_t n = 0; n < n_; ++n) {
        float amax = 0.f;
        for (int64_t k = 0; k < k_; ++k) amax = std::max(amax, std::fabs(wp[n * k_ + k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        w_scale_[n] = amax / 127.f;
        for (int64_t k = 0; k < k_; ++k) {
          const int64_t at = (((n / kPanel) * K4 + k / 4) * kPanel + n % kPanel) * 4 + k % 4;
          w_i8_[at] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(wp[n * k_ + k] * inv))));
        }
      }
      break;
    }
  }
}

void PackedLinear::prepare_rows(Isa isa, const float* x, int64_t ldx, int64_t m0, int64_t m1, float* rounded, int8_t* q, float* scale) const {
  if (precision_ == Precision::kFloat32) return;
  const int64_t Kp = quantized_stride();
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
#if COSTEFF_HAVE_AVX2_PATH
    if (isa == Isa::kAvx2) {
      if (precision_ == Precision::kBFloat16) round_rows_bf16_avx2(xr, rounded + m * ldx, k_);
      else quantize_row_avx2(xr, k_, Kp, q + m * Kp, scale + m);
      continue;
    }
#endif
    if (precision_ == Precision::kBFloat16) {
      for (int64_t k = 0; k < k_; ++k) rounded[m * ldx + k] = round_to_bf16(xr[k]);
    } else {
      quantize_row_portable(xr, k_, Kp, q + m * Kp, scale + m);
    }
  }
}

void PackedLinear::run(Isa isa, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t ldy, Activation act) const {
  // Rows in chunks whose activations stay in L2 while every panel passes over them (each panel stays
  // in L1 across the chunk's micro-kernel calls).
  const int64_t row_bytes = precision_ == Precision::kInt8 ? quantized_stride() : k_ * 4;
  const int64_t chunk = std::max<int64_t>(24, (int64_t(192) << 10) / std::max<int64_t>(1, row_bytes) / 24 * 24);
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) run_chunk(isa, in, c0, std::min(m1, c0 + chunk), p0, p1, y, ldy, act);
}

void PackedLinear::run_chunk(Isa isa, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t ldy, Activation act) const {
  const int64_t rows = m1 - m0;
  if (rows <= 0) return;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * kPanel, ncols = std::min(kPanel, n_ - c0);
    float* yp = y + m0 * ldy + c0;
    const float* bias = bias_.data() + c0;
    if (precision_ == Precision::kInt8) {
      const int64_t K4 = quantized_stride() / 4;
      const int8_t* w = w_i8_.data() + p * K4 * kPanel * 4;
      const int8_t* q = in.q + m0 * in.stride;
      const float* sx = in.scale + m0;
#if COSTEFF_HAVE_AVX2_PATH
      if (isa == Isa::kAvx2) {
        run_int8_avx2(q, in.stride, sx, rows, w, K4, w_scale_.data() + c0, bias, yp, ldy, ncols, act);
        continue;
      }
#endif
      run_int8_portable(q, in.stride, sx, rows, w, K4, w_scale_.data() + c0, bias, yp, ldy, ncols, act);
      continue;
    }
    const float* x = in.f32 + m0 * in.stride;
    const float* wf = precision_ == Precision::kFloat32 ? w_f32_.data() + p * k_ * kPanel : nullptr;
    const uint16_t* wb = precision_ == Precision::kBFloat16 ? w_bf16_.data() + p * k_ * kPanel : nullptr;
#if COSTEFF_HAVE_AVX2_PATH
    if (isa == Isa::kAvx2) {
      if (wb != nullptr) run_float_avx2<true>(x, in.stride, rows, wf, wb, k_, bias, yp, ldy, ncols, act);
      else run_float_avx2<false>(x, in.stride, rows, wf, wb, k_, bias, yp, ldy, ncols, act);
      continue;
    }
#endif
    run_float_portable(x, in.stride, rows, wf, wb, k_, bias, yp, ldy, ncols, act);
  }
}

void gelu_rows(Isa isa, float* x, int64_t n) {
#if COSTEFF_HAVE_AVX2_PATH
  if (isa == Isa::kAvx2) return map_rows_avx2(x, n, Activation::kGelu);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_scalar(x[i]);
}

void tanh_rows(Isa isa, float* x, int64_t n) {
#if COSTEFF_HAVE_AVX2_PATH
  if (isa == Isa::kAvx2) return map_rows_avx2(x, n, Activation::kTanh);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
}

}  // namespace costeff::engine
