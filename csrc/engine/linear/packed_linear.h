#pragma once
// A linear layer y = act(x W^T + b) packed once for the inference engine, in one of three precisions.
// The layouts are the same for every instruction set (the kernels of linear/<isa>/ read them):
//   fp32: panels of 16 output columns, [N/16][K][16].
//   bf16: panels of 16 columns holding pairs of consecutive k, [N/16][K2][16][2] (K2 = ceil(K/2),
//         zero-padded); activations are rounded to bf16 before the GEMM, products are exact in fp32
//         and accumulate in fp32 (what AVX512-BF16's vdpbf16ps computes).
//   int8: per-output-channel symmetric int8 weights ([-127, 127], scale max|w|/127) in panels of 16
//         columns holding quads of consecutive k, [N/16][K4][16][4] (K4 = ceil(K/4), zero-padded), and
//         each column's weight sum; activations are quantized per row (symmetric, scale max|x|/127),
//         int32 accumulation, y = acc * (scale_x * scale_w) + b in fp32.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace costeff::engine {

enum class Precision { kFloat32, kBFloat16, kInt8 };

Precision parse_precision(const std::string& name);
std::string precision_name(Precision p);

// Activations prepared for one precision by PackedLinear::prepare_rows.
struct PreparedInput {
  const float* f32 = nullptr;     // fp32 rows, stride `stride` floats
  const uint16_t* bf16 = nullptr; // bf16 rows, stride `stride` uint16 (2 * K2)
  const int8_t* q = nullptr;      // int8 rows, stride `stride` bytes (4 * K4)
  const float* scale = nullptr;   // int8: one per row
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
  // Stride (elements) of a prepared row: bf16 K rounded up to 2, int8 K rounded up to 4, fp32 0 (unused).
  int64_t prepared_stride() const;
  // Multiply-adds per row, for work estimates.
  int64_t macs_per_row() const { return n_ * k_; }

  // Rows [m0, m1) of x (stride ldx) into the precision's prepared form: bf16 into `bf16` and int8 into
  // `q` + `scale` (row m at m * prepared_stride()). fp32 needs nothing.
  void prepare_rows(const LinearKernels& kern, const float* x, int64_t ldx, int64_t m0, int64_t m1, uint16_t* bf16, int8_t* q,
                    float* scale) const;
  // y[m, p*16 : (p+1)*16] = act(x[m] W^T + b) for rows [m0, m1) and panels [p0, p1); y has stride ldy
  // and the columns past N are not written.
  void run(const LinearKernels& kern, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y,
           int64_t ldy, Activation act) const;

 private:
  void run_chunk(const LinearKernels& kern, const PreparedInput& in, int64_t m0, int64_t m1, int64_t p0, int64_t p1, float* y,
                 int64_t ldy, Activation act) const;

  int64_t n_ = 0, k_ = 0;
  Precision precision_ = Precision::kFloat32;
  std::vector<float> w_f32_;
  std::vector<uint16_t> w_bf16_;
  std::vector<int8_t> w_i8_;
  std::vector<float> w_scale_;  // int8: per output channel, zero-padded to whole panels
  std::vector<int32_t> w_sum_;  // int8: sum over k of each column's int8 weights, zero-padded
  std::vector<float> bias_;     // zero-padded to whole panels
};

}  // namespace costeff::engine
