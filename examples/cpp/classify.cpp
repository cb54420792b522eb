// Classifies token-id rows with a saved costeff model on the C++ early-exit engine (no Python).
//
//   costeff_classify MODEL_DIR [--precision fp32|bf16|int8] [--threshold NATS] ROW [ROW ...]
//
// MODEL_DIR is what save_pretrained writes (config.json + model.safetensors); each ROW is
// comma-separated token ids, e.g. 101,2307,3185,102 (rows of different lengths are padded and masked).
// Prints one JSON line per row: {"row", "label" (index), "exit_layer", "entropy", "logits"}.
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace {

int usage(const char* why) {
  std::cerr << "costeff_classify: " << why << "\n"
            << "usage: costeff_classify MODEL_DIR [--precision fp32|bf16|int8] [--threshold NATS] ROW [ROW ...]\n"
            << "  ROW: comma-separated token ids, e.g. 101,2307,3185,102\n";
  return 2;
}

bool parse_row(const std::string& text, std::vector<int64_t>& ids) {
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || end == nullptr || *end != '\0') return false;
    ids.push_back(v);
  }
  return !ids.empty();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage("need a model directory and at least one row");
  const std::string dir = argv[1];
  std::string precision = "fp32";
  double threshold = 0.0;
  std::vector<std::vector<int64_t>> rows;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--precision" && i + 1 < argc) {
      precision = argv[++i];
    } else if (a == "--threshold" && i + 1 < argc) {
      char* end = nullptr;
      threshold = std::strtod(argv[++i], &end);
      if (end == nullptr || *end != '\0') return usage("--threshold needs a number");
    } else {
      std::vector<int64_t> ids;
      if (!parse_row(a, ids)) return usage(("not a row of token ids: " + a).c_str());
      rows.push_back(std::move(ids));
    }
  }
  if (rows.empty()) return usage("no rows given");
  try {
    auto engine = costeff::engine::InferenceEngine::from_directory(dir, precision);
    size_t width = 0;
    for (const auto& r : rows) width = std::max(width, r.size());
    auto ids = torch::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(width)}, torch::kLong);
    auto mask = torch::zeros_like(ids);
    for (size_t b = 0; b < rows.size(); ++b)
      for (size_t t = 0; t < rows[b].size(); ++t) {
        ids[b][t] = rows[b][t];
        mask[b][t] = 1;
      }
    auto [logits, exit_layer, entropy] = engine->run(ids, mask, std::nullopt, threshold);
    std::cout.precision(8);
    for (int64_t b = 0; b < logits.size(0); ++b) {
      std::cout << "{\"row\": " << b << ", \"label\": " << logits[b].argmax().item<int64_t>() << ", \"exit_layer\": "
                << exit_layer[b].item<int64_t>() << ", \"entropy\": " << entropy[b].item<float>() << ", \"logits\": [";
      for (int64_t k = 0; k < logits.size(1); ++k) std::cout << (k ? ", " : "") << logits[b][k].item<float>();
      std::cout << "]}\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "costeff_classify: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
