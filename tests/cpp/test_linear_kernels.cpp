// C++ test of the engine's linear micro-kernels (csrc/engine/linear/): every instruction set this CPU
// runs, in every precision and activation, on odd K/N and ragged row counts, against a float64
// reference of the same math and against the portable kernels. ISAs the CPU lacks are reported as
// skipped by name.
#include <ATen/ATen.h>

#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "engine/linear/packed_linear.h"

using namespace costeff::engine;

namespace {

int g_checks = 0, g_failures = 0;

double act_ref(double v, Activation a) {
  switch (a) {
    case Activation::kGelu: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Activation::kTanh: return std::tanh(v);
    case Activation::kRelu: return v > 0 ? v : 0;
    default: return v;
  }
}

// float64 reference of what a precision computes: bf16 rounds x and w first; int8 quantizes x per row
// and w per column (symmetric, round half to even) and rescales the exact integer dot product.
at::Tensor row_amax(const at::Tensor& t) { return t.size(1) == 0 ? at::zeros({t.size(0), 1}) : t.abs().amax(1, true); }

std::vector<double> reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, Precision p, Activation a) {
  at::Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
  at::Tensor y;
  if (p == Precision::kBFloat16) {
    y = at::matmul(x.to(at::kBFloat16).to(at::kDouble), w.to(at::kBFloat16).to(at::kDouble).t());
  } else if (p == Precision::kInt8) {
    const auto xa = row_amax(x), wa = row_amax(w);                 // fp32, as the kernels
    const auto qx = at::round(x * at::where(xa > 0, 127.f / xa, at::zeros_like(xa)));  // fp32 product, then RNE
    const auto qw = at::clamp(at::round(w * at::where(wa > 0, 127.f / wa, at::zeros_like(wa))), -127, 127);
    y = at::matmul(qx.to(at::kDouble), qw.to(at::kDouble).t()) * (xa / 127.f).to(at::kDouble) * (wa / 127.f).to(at::kDouble).t();
  } else {
    y = at::matmul(xd, wd.t());
  }
  y = (y + b.to(at::kDouble)).contiguous();
  std::vector<double> out(y.data_ptr<double>(), y.data_ptr<double>() + y.numel());
  for (double& v : out) v = act_ref(v, a);
  return out;
}

std::vector<float> run(const LinearKernels& kern, const PackedLinear& lin, const at::Tensor& x, Activation a) {
  const int64_t M = x.size(0), K = x.size(1), N = lin.out_features(), stride = lin.prepared_stride();
  std::vector<uint16_t> bf16(M * stride);
  std::vector<int8_t> q(M * stride);
  std::vector<float> scale(M), y(M * N, NAN);
  lin.prepare_rows(kern, x.data_ptr<float>(), K, 0, M, bf16.data(), q.data(), scale.data());
  PreparedInput in{x.data_ptr<float>(), bf16.data(), q.data(), scale.data(), lin.precision() == Precision::kFloat32 ? K : stride};
  lin.run(kern, in, 0, M, 0, lin.panels(), y.data(), N, a);
  return y;
}

void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol) {
  ++g_checks;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double excess = std::abs(got[i] - want[i]) - (atol + rtol * std::abs(want[i]));
    if (!(excess <= 0) && (i == 0 || !(excess <= worst))) worst = std::isnan(excess) ? INFINITY : excess, at = i;
  }
  if (worst > 0) {
    ++g_failures;
    std::cerr << "FAIL " << what << ": element " << at << " is " << got[at] << ", expected " << want[at] << "\n";
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const Activation acts[] = {Activation::kNone, Activation::kGelu, Activation::kTanh, Activation::kRelu};
  const char* act_names[] = {"none", "gelu", "tanh", "relu"};
  const Precision precs[] = {Precision::kFloat32, Precision::kBFloat16, Precision::kInt8};
  // (M, K, N): ragged rows around every micro-kernel height, K not a multiple of 2 or 4, N not of 16, empty sizes
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 17}, {7, 37, 45}, {9, 64, 16}, {13, 131, 33}, {29, 384, 128}, {4, 0, 5}, {6, 3, 0}};
  const LinearKernels& portable = kernels_for("portable");
  for (const auto& [isa, supported] : isa_support()) {
    if (!supported) {
      std::cout << "SKIP " << isa << ": this CPU lacks it\n";
      continue;
    }
    const LinearKernels& kern = kernels_for(isa);
    for (const auto& s : shapes) {
      const int64_t M = s[0], K = s[1], N = s[2];
      const auto x = at::randn({M, K}), w = at::randn({N, K}) / std::sqrt(double(std::max<int64_t>(K, 1))), b = at::randn({N});
      for (Precision p : precs) {
        const PackedLinear lin(w, b, p, "w");
        for (int ai = 0; ai < 4; ++ai) {
          const std::string what = isa + " " + precision_name(p) + " " + act_names[ai] + " M=" + std::to_string(M) + " K=" + std::to_string(K) +
                                   " N=" + std::to_string(N);
          const auto got = run(kern, lin, x, acts[ai]);
          // fp32 summation error grows with K; the activations' approximations are within ~2e-7
          check(what + " vs float64", got, reference(x, w, b, p, acts[ai]), 2e-6 * std::sqrt(double(K) + 1) + 1e-6, 1e-5);
          const auto port = run(portable, lin, x, acts[ai]);
          check(what + " vs portable", got, std::vector<double>(port.begin(), port.end()), 2e-6 * std::sqrt(double(K) + 1) + 1e-6, 1e-5);
        }
      }
    }
    std::cout << "OK " << isa << "\n";
  }
  // A forced ISA that is not known gets a clear error.
  ++g_checks;
  try {
    kernels_for("sse9");
    ++g_failures;
    std::cerr << "FAIL kernels_for(sse9) did not throw\n";
  } catch (const c10::ValueError& e) {
    if (std::string(e.what()).find("COSTEFF_ENGINE_ISA") == std::string::npos) ++g_failures, std::cerr << "FAIL error does not name COSTEFF_ENGINE_ISA\n";
  }
  std::cout << g_checks << " checks, " << g_failures << " failures\n";
  return g_failures == 0 ? 0 : 1;
}
