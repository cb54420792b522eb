#pragma once
// The engine's linear micro-kernels behind one table of function pointers, filled once per
// instruction set (the way XNNPACK and torchao organise theirs). A kernel computes one packed panel of
// 16 output columns for `rows` rows:
//   y[r, 0:ncols] = act(x[r] . W_panel + bias)      (columns past ncols are not written)
// Layouts (pack.h) are the same for every ISA; the prepared activations of a precision belong to the
// table that prepared them (the int8 rows of avx512_vnni are shifted to unsigned), so a table's
// prepare and run functions are always used together.
//
// Adding an ISA: write csrc/engine/linear/<isa>/linear_<precision>_<isa>.cpp for the precisions it
// speeds up, declare them below, add an Isa value, its CPU check and its table in select.cpp (reuse
// the entries of the ISA below it for the rest), and list it in docs/engine.md.
#include <cstdint>
#include <string>
#include <vector>

#include "activation.h"

namespace costeff::engine {

constexpr int64_t kPanel = 16;  // output columns per packed panel

// Ordered: every ISA can run the kernels of the ones before it.
enum class Isa { kPortable, kAvx2, kAvx512, kAvx512Vnni, kAvx512Bf16 };

// fp32 weights [K][16] of one panel.
using Fp32PanelFn = void (*)(const float* x, int64_t ldx, int64_t rows, const float* w, int64_t K, const float* bias,
                             float* y, int64_t ldy, int64_t ncols, Activation act);
// bf16 weights [K2][16][2] of one panel; x: prepared bf16 rows (K2 pairs, stride ldx in uint16).
using Bf16PanelFn = void (*)(const uint16_t* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t K2,
                             const float* bias, float* y, int64_t ldy, int64_t ncols, Activation act);
// int8 weights [K4][16][4] of one panel with their per-column scales `sw` and sums `wsum`; q: prepared
// int8 rows (K4 quads, stride ldq bytes) with per-row scales sx.
using Int8PanelFn = void (*)(const int8_t* q, int64_t ldq, const float* sx, int64_t rows, const int8_t* w, int64_t K4,
                             const float* sw, const int32_t* wsum, const float* bias, float* y, int64_t ldy,
                             int64_t ncols, Activation act);
// One row of K floats -> K2 = ceil(K/2) bf16 pairs (round to nearest even, NaN kept, zero-padded).
using PrepareBf16Fn = void (*)(const float* x, int64_t K, uint16_t* out);
// One row of K floats -> Kp >= K int8 (symmetric, scale max|x|/127; padding is the quantized 0) and its scale.
using QuantizeFn = void (*)(const float* x, int64_t K, int64_t Kp, int8_t* q, float* scale);
// x[i] = act(x[i]) for n floats.
using ActivateFn = void (*)(float* x, int64_t n, Activation act);

struct LinearKernels {
  Isa isa;
  const char* name;
  Fp32PanelFn fp32_panel;
  Bf16PanelFn bf16_panel;
  Int8PanelFn int8_panel;
  PrepareBf16Fn prepare_bf16;
  QuantizeFn quantize;
  ActivateFn activate;
  // The attention core and LayerNorm rows outside this table take the AVX2 code on every ISA from avx2 up.
  bool avx2_rows;
};

// The table for `name` ("auto" | "portable" | "avx2" | "avx512" | "avx512_vnni" | "avx512_bf16"):
// "auto" (or empty) is the best this CPU runs; a forced ISA the CPU lacks raises c10::ValueError.
const LinearKernels& kernels_for(const std::string& name);
// kernels_for(COSTEFF_ENGINE_ISA or "auto").
const LinearKernels& select_kernels();
// Every ISA name this build knows, in order, and whether this CPU runs it.
std::vector<std::pair<std::string, bool>> isa_support();

// Per-ISA entries (defined in csrc/engine/linear/<isa>/linear_<precision>_<isa>.cpp).
namespace portable {
void fp32_panel(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, Activation);
void bf16_panel(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int64_t, Activation);
void int8_panel(const int8_t*, int64_t, const float*, int64_t, const int8_t*, int64_t, const float*, const int32_t*, const float*,
                float*, int64_t, int64_t, Activation);
void prepare_bf16(const float*, int64_t, uint16_t*);
void quantize(const float*, int64_t, int64_t, int8_t*, float*);
void activate(float*, int64_t, Activation);
}  // namespace portable

namespace avx2 {
void fp32_panel(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, Activation);
void bf16_panel(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int64_t, Activation);
void int8_panel(const int8_t*, int64_t, const float*, int64_t, const int8_t*, int64_t, const float*, const int32_t*, const float*,
                float*, int64_t, int64_t, Activation);
void prepare_bf16(const float*, int64_t, uint16_t*);
void quantize(const float*, int64_t, int64_t, int8_t*, float*);
void activate(float*, int64_t, Activation);
}  // namespace avx2

namespace avx512 {
void fp32_panel(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, Activation);
void bf16_panel(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int64_t, Activation);
}  // namespace avx512

namespace avx512_vnni {
void int8_panel(const int8_t*, int64_t, const float*, int64_t, const int8_t*, int64_t, const float*, const int32_t*, const float*,
                float*, int64_t, int64_t, Activation);
// Writes x/scale + 128 as unsigned bytes (what vpdpbusd multiplies); int8_panel subtracts 128 * wsum.
void quantize(const float*, int64_t, int64_t, int8_t*, float*);
}  // namespace avx512_vnni

namespace avx512_bf16 {
void bf16_panel(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*, int64_t, int64_t, Activation);
}  // namespace avx512_bf16

}  // namespace costeff::engine
