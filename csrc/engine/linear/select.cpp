// The kernel tables, one per instruction set, and the selector that picks one from the CPU's flags
// (or COSTEFF_ENGINE_ISA). Each table takes what its ISA speeds up and the entries of the ISA below
// it for the rest.
#include <c10/util/Exception.h>

#include <cstdlib>

#include "costeff/simd.h"
#include "kernels.h"

namespace costeff::engine {
namespace {

constexpr LinearKernels kPortable{Isa::kPortable,     "portable",        portable::fp32_panel, portable::bf16_panel, portable::int8_panel,
                                  portable::prepare_bf16, portable::quantize, portable::activate, false};
#if COSTEFF_HAVE_AVX2_PATH
constexpr LinearKernels kAvx2{Isa::kAvx2,        "avx2",        avx2::fp32_panel, avx2::bf16_panel, avx2::int8_panel,
                              avx2::prepare_bf16, avx2::quantize, avx2::activate, true};
constexpr LinearKernels kAvx512{Isa::kAvx512,     "avx512",      avx512::fp32_panel, avx512::bf16_panel, avx2::int8_panel,
                                avx2::prepare_bf16, avx2::quantize, avx2::activate, true};
constexpr LinearKernels kAvx512Vnni{Isa::kAvx512Vnni, "avx512_vnni", avx512::fp32_panel, avx512::bf16_panel, avx512_vnni::int8_panel,
                                    avx2::prepare_bf16, avx512_vnni::quantize, avx2::activate, true};
constexpr LinearKernels kAvx512Bf16{Isa::kAvx512Bf16, "avx512_bf16", avx512::fp32_panel, avx512_bf16::bf16_panel, avx512_vnni::int8_panel,
                                    avx2::prepare_bf16, avx512_vnni::quantize, avx2::activate, true};
#endif

struct Entry {
  const LinearKernels* table;
  bool (*supported)();
};

bool always() { return true; }

// Worst to best: "auto" takes the last one the CPU runs.
const Entry kEntries[] = {
    {&kPortable, always},
#if COSTEFF_HAVE_AVX2_PATH
    {&kAvx2, simd::cpu_has_avx2_fma},
    {&kAvx512, simd::cpu_has_avx512},
    {&kAvx512Vnni, simd::cpu_has_avx512_vnni},
    {&kAvx512Bf16, simd::cpu_has_avx512_bf16},
#endif
};

std::string known_names() {
  std::string out = "'auto'";
  for (const Entry& e : kEntries) out += std::string(", '") + e.table->name + "'";
  return out;
}

}  // namespace

const LinearKernels& kernels_for(const std::string& name) {
  if (name.empty() || name == "auto") {
    const LinearKernels* best = kEntries[0].table;
    for (const Entry& e : kEntries)
      if (e.supported()) best = e.table;
    return *best;
  }
  for (const Entry& e : kEntries) {
    if (name != e.table->name) continue;
    TORCH_CHECK_VALUE(e.supported(), "costeff engine: instruction set '", name, "' was asked for (COSTEFF_ENGINE_ISA) but this CPU lacks it; ",
                      "it runs: ", [] {
                        std::string s;
                        for (const Entry& x : kEntries)
                          if (x.supported()) s += std::string(s.empty() ? "" : ", ") + x.table->name;
                        return s;
                      }());
    return *e.table;
  }
  TORCH_CHECK_VALUE(false, "costeff engine: COSTEFF_ENGINE_ISA must be one of ", known_names(), ", got '", name, "'");
}

const LinearKernels& select_kernels() {
  const char* forced = std::getenv("COSTEFF_ENGINE_ISA");
  return kernels_for(forced != nullptr ? forced : "auto");
}

std::vector<std::pair<std::string, bool>> isa_support() {
  std::vector<std::pair<std::string, bool>> out;
  for (const Entry& e : kEntries) out.emplace_back(e.table->name, e.supported());
  return out;
}

}  // namespace costeff::engine
