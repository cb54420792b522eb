// The engine's TorchScript/Python face: torch.classes.costeff.InferenceEngine (see engine.h).
#include <torch/library.h>

#include <ATen/ATen.h>

#include <cstdlib>
#include <sstream>

#include "engine.h"
#include "session.h"
#include "session_worker.h"

namespace costeff::engine {
namespace {

Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK_VALUE(false, "costeff engine: activation must be 'none', 'gelu', 'tanh' or 'relu', got '", name, "'");
}

// One packed linear layer through one instruction set's kernels, as the engine runs it (single
// thread): the tests compare every ISA the CPU has against the portable one and a float64 reference.
at::Tensor engine_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::string& precision,
                         const std::string& isa, const std::string& activation) {
  const LinearKernels& kern = kernels_for(isa);
  const PackedLinear lin(weight, bias, parse_precision(precision), "weight");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == lin.in_features(), "_engine_linear: x must be [rows, ", lin.in_features(), "], got ", x.sizes());
  const auto xf = x.to(at::kCPU, at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = lin.in_features(), N = lin.out_features();
  auto y = at::zeros({M, N}, at::kFloat);
  const int64_t stride = lin.prepared_stride();
  std::vector<uint16_t> bf16(M * stride);
  std::vector<int8_t> q(M * stride);
  std::vector<float> scale(M);
  lin.prepare_rows(kern, xf.data_ptr<float>(), K, 0, M, bf16.data(), q.data(), scale.data());
  PreparedInput in;
  in.f32 = xf.data_ptr<float>();
  in.bf16 = bf16.data();
  in.q = q.data();
  in.scale = scale.data();
  in.stride = lin.precision() == Precision::kFloat32 ? K : stride;
  lin.run(kern, in, 0, M, 0, lin.panels(), y.data_ptr<float>(), N, parse_activation(activation));
  return y;
}

// Known and supported ISAs, and what a new engine takes (select_kernels: COSTEFF_ENGINE_ISA or the
// CPU's best; "unavailable: <value>" when COSTEFF_ENGINE_ISA names one it cannot take).
std::tuple<std::vector<std::string>, std::vector<std::string>, std::string> engine_isas() {
  std::vector<std::string> known, supported;
  for (const auto& [name, ok] : isa_support()) {
    known.push_back(name);
    if (ok) supported.push_back(name);
  }
  std::string selected;
  try {
    selected = select_kernels().name;
  } catch (const c10::ValueError&) {
    const char* forced = std::getenv("COSTEFF_ENGINE_ISA");
    selected = std::string("unavailable: ") + (forced != nullptr ? forced : "");
  }
  return {known, supported, selected};
}

// The fields the engine reads from a config.json, as JSON: the tests compare them with CostEffConfig's
// on every config they save, so the two readers (and their defaults) cannot drift apart.
std::string engine_config(const std::string& config_json) {
  const EngineConfig c = EngineConfig::from_json(config_json);
  std::ostringstream o;
  o.precision(17);
  const auto list = [&](const std::vector<int64_t>& v) {
    o << "[";
    for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
    o << "]";
  };
  const char* act = c.pooler_activation == Activation::kRelu ? "relu" : c.pooler_activation == Activation::kGelu ? "gelu" : "tanh";
  o << "{\"vocab_size\": " << c.vocab_size << ", \"hidden_size\": " << c.hidden_size << ", \"num_hidden_layers\": " << c.num_layers
    << ", \"max_position_embeddings\": " << c.max_positions << ", \"type_vocab_size\": " << c.type_vocab_size
    << ", \"num_labels\": " << c.num_labels << ", \"embedding_rank\": " << c.embedding_rank << ", \"pruned_vocab_size\": " << c.pruned_vocab_size
    << ", \"exit_start\": " << c.exit_start << ", \"exit_pooler_dense\": " << (c.exit_pooler_dense ? "true" : "false")
    << ", \"exit_pooling\": \"" << (c.mean_pooling ? "mean" : "cls") << "\", \"pooler_activation\": \"" << act
    << "\", \"embedding_size\": " << c.embedding_size << ", \"position_offset\": " << c.position_offset << ", \"layer_norm_eps\": " << c.layer_norm_eps
    << ", \"num_attention_heads\": ";
  list(c.heads);
  o << ", \"attention_head_size\": ";
  list(c.head_size);
  o << ", \"intermediate_size\": ";
  list(c.ffn);
  o << "}";
  return o.str();
}

}  // namespace

void register_engine(torch::Library& m) {
  // Test and introspection helpers: one linear layer through one ISA's kernels; the ISAs this build
  // knows and whether this CPU runs each.
  m.def("_engine_linear(Tensor x, Tensor weight, Tensor? bias, str precision, str isa, str activation) -> Tensor", engine_linear);
  m.def("_engine_isas() -> (str[] known, str[] supported, str selected)", engine_isas);
  m.def("_engine_config(str config_json) -> str", engine_config);
  m.class_<InferenceEngine>("InferenceEngine")
      .def(torch::init<c10::Dict<std::string, at::Tensor>, std::string, std::string>())
      // With an instruction set ("" = COSTEFF_ENGINE_ISA or the CPU's best).
      .def_static("build", [](c10::Dict<std::string, at::Tensor> weights, std::string config_json, std::string precision, std::string isa) {
        return c10::make_intrusive<InferenceEngine>(weights, config_json, precision, isa);
      })
      .def_static("from_directory", [](std::string path, std::string precision, std::string isa) { return InferenceEngine::from_directory(path, precision, isa); })
      .def("run", [](const c10::intrusive_ptr<InferenceEngine>& self, at::Tensor input_ids, std::optional<at::Tensor> attention_mask,
                     std::optional<at::Tensor> token_type_ids, double threshold) {
        return self->run(input_ids, attention_mask, token_type_ids, threshold);
      })
      // Seconds per stage summed over `repeats` runs of the same inputs (see run()).
      .def("profile", [](const c10::intrusive_ptr<InferenceEngine>& self, at::Tensor input_ids, std::optional<at::Tensor> attention_mask,
                         std::optional<at::Tensor> token_type_ids, double threshold, int64_t repeats) {
        std::map<std::string, double> acc;
        for (int64_t i = 0; i < repeats; ++i) self->run(input_ids, attention_mask, token_type_ids, threshold, &acc);
        c10::Dict<std::string, double> out;
        for (const auto& [k, v] : acc) out.insert(k, v);
        return out;
      })
      .def("precision", [](const c10::intrusive_ptr<InferenceEngine>& self) { return self->precision(); })
      .def("isa", [](const c10::intrusive_ptr<InferenceEngine>& self) { return self->isa(); })
      .def("num_labels", [](const c10::intrusive_ptr<InferenceEngine>& self) { return self->num_labels(); })
      .def("num_layers", [](const c10::intrusive_ptr<InferenceEngine>& self) { return self->num_layers(); });
  register_session(m);  // after InferenceEngine: a session is built on one
  register_session_worker(m);
}

}  // namespace costeff::engine
