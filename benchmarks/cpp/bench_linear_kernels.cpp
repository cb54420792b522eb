// The engine's linear kernels per instruction set, side by side: one packed layer of the demo
// student's shapes (activation preparation + GEMM + epilogue, one thread), every ISA this CPU runs
// and every precision, in interleaved rounds (median). Prints a table; writes JSON to argv[1] if given.
//   cmake --build build/cmake --target costeff_bench_linear_kernels && build/cmake/costeff_bench_linear_kernels out.json
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "engine/linear/packed_linear.h"

using namespace costeff::engine;

int main(int argc, char** argv) {
  at::set_num_threads(1);
  at::manual_seed(0);
  struct Shape {
    const char* name;
    int64_t M, K, N;
    Activation act;
  };
  // rows: one sentence (22 tokens) and a batch of 32; the demo student's layers (hidden 384, 2x64 heads, FFN 256)
  const Shape shapes[] = {{"qkv b1", 22, 384, 384, Activation::kNone},       {"ffn_in+gelu b1", 22, 384, 256, Activation::kGelu},
                          {"ffn_out b1", 22, 256, 384, Activation::kNone},   {"qkv b32", 704, 384, 384, Activation::kNone},
                          {"ffn_in+gelu b32", 704, 384, 256, Activation::kGelu}, {"ffn_out b32", 704, 256, 384, Activation::kNone}};
  const Precision precisions[] = {Precision::kFloat32, Precision::kBFloat16, Precision::kInt8};
  std::vector<std::string> isas;
  for (const auto& [name, ok] : isa_support())
    if (ok && name != "portable") isas.push_back(name);
  std::string json = "[";
  std::printf("%-18s %-6s", "shape", "prec");
  for (const auto& i : isas) std::printf(" %13s", (i + " GMAC/s").c_str());
  std::printf("\n");
  for (const Shape& s : shapes) {
    const auto x = at::randn({s.M, s.K}), w = at::randn({s.N, s.K}) / 20, b = at::randn({s.N});
    for (Precision p : precisions) {
      const PackedLinear lin(w, b, p, "w");
      const int64_t st = lin.prepared_stride();
      std::vector<uint16_t> bf(s.M * std::max<int64_t>(st, 1));
      std::vector<int8_t> q(s.M * std::max<int64_t>(st, 1));
      std::vector<float> sc(s.M), y(s.M * s.N);
      const PreparedInput in{x.data_ptr<float>(), bf.data(), q.data(), sc.data(), p == Precision::kFloat32 ? s.K : st};
      const int reps = std::max<int64_t>(1, 20000000 / (s.M * s.K * s.N / 16 + 1));
      std::vector<std::vector<double>> secs(isas.size());
      for (int round = 0; round < 9; ++round) {
        for (size_t i = 0; i < isas.size(); ++i) {
          const LinearKernels& kern = kernels_for(isas[i]);
          const auto t0 = std::chrono::steady_clock::now();
          for (int r = 0; r < reps; ++r) {
            lin.prepare_rows(kern, x.data_ptr<float>(), s.K, 0, s.M, bf.data(), q.data(), sc.data());
            lin.run(kern, in, 0, s.M, 0, lin.panels(), y.data(), s.N, s.act);
          }
          if (round > 0) secs[i].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
        }
      }
      std::printf("%-18s %-6s", s.name, precision_name(p).c_str());
      for (size_t i = 0; i < isas.size(); ++i) {
        auto v = secs[i];
        std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
        const double med = v[v.size() / 2], gmacs = double(s.M) * s.K * s.N / med / 1e9;
        std::printf(" %13.1f", gmacs);
        json += std::string(json.size() > 1 ? "," : "") + "\n {\"shape\": \"" + s.name + "\", \"precision\": \"" + precision_name(p) + "\", \"isa\": \"" +
                isas[i] + "\", \"us\": " + std::to_string(med * 1e6) + ", \"gmac_per_s\": " + std::to_string(gmacs) + "}";
      }
      std::printf("\n");
    }
  }
  json += "\n]\n";
  if (argc > 1) std::ofstream(argv[1]) << json;
  return 0;
}
