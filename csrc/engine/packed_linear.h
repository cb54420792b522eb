#pragma once
// A linear layer y = x W^T + b packed once for the inference engine, in one of three precisions:
//   fp32: W as panels of 16 output columns, [N/16][K][16].
//   bf16: the same panels holding bf16 bits; activations are rounded to bf16 before the GEMM, products
//         are exact in fp32 and accumulate in fp32 (what AVX512-BF16's dot product computes).
//   int8: per-output-channel symmetric int8 weights ([-127, 127], scale max|w|/127), panels of
//         [N/16][K/4][16][4]; activations are quantized per row (symmetric, scale max|x|/127), int32
//         accumulation, y = acc * (scale_x * scale_w) + b in fp32.
// Two instruction sets: AVX2+FMA (int8 through the sign/maddubs trick: |x| * sign(w, x) keeps every
// 16-bit pair sum within 2 * 127 * 127, so nothing saturates) and a portable C++ fallback with the same
// math, which COSTEFF_ENGINE_ISA=portable forces.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace costeff::engine {

enum class Precision { kFloat32, kBFloat16, kInt8 };
enum class Isa { kAvx2, kPortable };
enum class Activation { kNone, kGelu, kTanh, kRelu };

Precision parse_precision(const std::string& name);
std::string precision_name(Precision p);
// The instruction set the engine uses: AVX2+FMA when the CPU has it, unless COSTEFF_ENGINE_ISA=portable.
Isa select_isa();
std::string isa_name(Isa isa);

constexpr int64_t kPanel = 16;  // output columns per packed panel

// Activations prepared for one precision: bf16 rounds in place into `f32`, int8 fills `q` and `scale`.
struct PreparedInput {
  const float* f32 = nullptr;  // fp32/bf16 rows, stride `stride`
  const int8_t* q = nullptr;   // int8 rows, stride `stride` (K rounded up to 4, zero-padded)
  const float* scale = nullptr;
  int64_t stride = 0;
};

class PackedLinear {
 public:
  PackedLinear() = default;
  // weight [N, K] and bias [N] (any float dtype, CPU); `name` appears in error messages.
  PackedLinear(const at::Tensor& weight, const std::optional<at::Tensor>& bias, Precision precision, const std::string& name);

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  int64_t panels() const { return (n_ + kPanel - 1) / kPanel; }
  Precision precision() const { return precision_; }
  // Stride (elements) of a prepared int8 row: K rounded up to 4.
  int64_t quantized_stride() const { return (k_ + 3) / 4 * 4; }
  // Multiply-adds per row, for work estimates.
  int64_t macs_per_row() const { return n_ * k_; }

  // Per-row preparation of rows [m0, m1) of x (stride ldx): bf16 rounds into `rounded` (stride ldx),
  // int8 quantizes into `q` (stride quantized_stride()) and `scale`. fp32 needs nothing.
  void prepare_rows(Isa isa, const float* x, int64_t ldx, int64_t m0, int64_t m1, float* rounded, int8_t* q, float* scale) const;
  // y[m, p*16 : (p+1)*16] = act(x[m] W^T + b) for rows [m0, m1) and panels [p0, p1); y has stride ldy and
  // the columns past N are not written.
  void run(Isa isa, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t ldy, Activation act) const;

 private:
  void run_chunk(Isa isa, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y, int64_t ldy, Activation act) const;

  int64_t n_ = 0, k_ = 0;
  Precision precision_ = Precision::kFloat32;
  std::vector<float> w_f32_;
  std::vector<uint16_t> w_bf16_;
  std::vector<int8_t> w_i8_;
  std::vector<float> w_scale_;  // int8: per output channel, zero-padded to whole panels
  std::vector<float> bias_;     // zero-padded to whole panels
};

// Shared element-wise helpers (AVX2 or portable), used by the engine between GEMMs.
void gelu_rows(Isa isa, float* x, int64_t n);
void tanh_rows(Isa isa, float* x, int64_t n);
// bf16 round-to-nearest-even of one float (NaN stays NaN).
float round_to_bf16(float x);

}  // namespace costeff::engine
