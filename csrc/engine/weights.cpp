// Building an engine: every weight fetched by name, checked against the config and packed once;
// from a model directory through load_safetensors (see engine.h).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <fstream>
#include <sstream>

#include "engine.h"

namespace costeff::engine {
namespace {

std::vector<float> to_vector(const at::Tensor& t) {
  const auto f = t.to(at::kCPU, at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// The tensor `name` of `weights`, checked against the shape the config implies and for NaN/Inf.
at::Tensor fetch(const c10::Dict<std::string, at::Tensor>& weights, const std::string& name, std::vector<int64_t> shape) {
  TORCH_CHECK_VALUE(weights.contains(name), "costeff engine: weight '", name, "' is missing (the weights must be the state_dict of a CostEffForSequenceClassification)");
  const at::Tensor t = weights.at(name);
  TORCH_CHECK_VALUE(t.defined(), "costeff engine: weight '", name, "' is undefined");
  TORCH_CHECK_VALUE(t.sizes().vec() == shape, "costeff engine: weight '", name, "' has shape ", t.sizes(), " but the config implies ", c10::IntArrayRef(shape));
  TORCH_CHECK_TYPE(t.is_floating_point(), "costeff engine: weight '", name, "' must be a float tensor, got ", t.scalar_type());
  const auto f = t.to(at::kCPU, at::kFloat).contiguous();
  TORCH_CHECK_VALUE(f.numel() == 0 || at::isfinite(f).all().item<bool>(), "costeff engine: weight '", name, "' holds NaN or Inf");
  return f;
}

// The integer tensor `name` [n] of `weights`, every value checked to index a table of `rows` rows.
std::vector<int64_t> fetch_rows(const c10::Dict<std::string, at::Tensor>& weights, const std::string& name, int64_t n, int64_t rows) {
  TORCH_CHECK_VALUE(weights.contains(name), "costeff engine: tensor '", name, "' is missing (config.pruned_vocab_size is set)");
  const at::Tensor t = weights.at(name);
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 1 && t.size(0) == n, "costeff engine: tensor '", name, "' must have shape [", n, "]");
  TORCH_CHECK_TYPE(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, "costeff engine: tensor '", name,
                   "' must hold integers, got ", t.scalar_type());
  const auto l = t.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> out(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + n);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(out[i] >= 0 && out[i] < rows, "costeff engine: '", name, "'[", i, "] = ", out[i], " is not a row of the ", rows,
                      "-row word embedding");
  return out;
}

}  // namespace

InferenceEngine::InferenceEngine(const c10::Dict<std::string, at::Tensor>& weights, const std::string& config_json, const std::string& precision,
                                 const std::string& isa)
    : config_(EngineConfig::from_json(config_json)), precision_(parse_precision(precision)), kern_(isa.empty() ? &select_kernels() : &kernels_for(isa)) {
  const EngineConfig& c = config_;
  const int64_t H = c.hidden_size;
  const std::string e = "costeff.embeddings.";
  const int64_t E = c.embedding_size > 0 ? c.embedding_size : H;  // ELECTRA: tables narrower than hidden
  const int64_t word_width = c.embedding_rank > 0 ? c.embedding_rank : E;
  const int64_t word_rows = c.pruned_vocab_size > 0 ? c.pruned_vocab_size : c.vocab_size;
  word_embeddings_ = to_vector(fetch(weights, e + "word_embeddings.weight", {word_rows, word_width}));
  if (c.pruned_vocab_size > 0) token_id_map_ = fetch_rows(weights, e + "token_id_map", c.vocab_size, word_rows);
  if (c.embedding_rank > 0) {
    word_projection_ = PackedLinear(fetch(weights, e + "word_projection.weight", {E, c.embedding_rank}), std::nullopt, precision_, e + "word_projection.weight");
  }
  position_embeddings_ = to_vector(fetch(weights, e + "position_embeddings.weight", {c.max_positions, E}));
  token_type_embeddings_ = to_vector(fetch(weights, e + "token_type_embeddings.weight", {c.type_vocab_size, E}));
  embed_norm_weight_ = to_vector(fetch(weights, e + "LayerNorm.weight", {E}));
  embed_norm_bias_ = to_vector(fetch(weights, e + "LayerNorm.bias", {E}));
  if (c.embedding_size > 0) {
    embedding_projection_ = PackedLinear(fetch(weights, e + "embedding_projection.weight", {H, E}), fetch(weights, e + "embedding_projection.bias", {H}),
                                         precision_, e + "embedding_projection.weight");
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "costeff.layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.heads = c.heads[i];
    L.head_size = c.head_size[i];
    L.ffn = c.ffn[i];
    const int64_t inner = L.heads * L.head_size;
    const auto qkv_w = fetch(weights, p + "attention.qkv_weight", {3 * inner, H});
    const auto qkv_b = fetch(weights, p + "attention.qkv_bias", {3 * inner});
    const auto out_w = fetch(weights, p + "attention.out_weight", {H, inner});
    const auto out_b = fetch(weights, p + "attention.out_bias", {H});
    if (inner > 0) {
      L.qkv = PackedLinear(qkv_w, qkv_b, precision_, p + "attention.qkv_weight");
      L.attn_out = PackedLinear(out_w, out_b, precision_, p + "attention.out_weight");
    }
    L.attn_out_bias = to_vector(out_b);
    const auto in_w = fetch(weights, p + "ffn.in_weight", {L.ffn, H});
    const auto in_b = fetch(weights, p + "ffn.in_bias", {L.ffn});
    const auto fo_w = fetch(weights, p + "ffn.out_weight", {H, L.ffn});
    const auto fo_b = fetch(weights, p + "ffn.out_bias", {H});
    if (L.ffn > 0) {
      L.ffn_in = PackedLinear(in_w, in_b, precision_, p + "ffn.in_weight");
      L.ffn_out = PackedLinear(fo_w, fo_b, precision_, p + "ffn.out_weight");
    }
    L.ffn_out_bias = to_vector(fo_b);
    L.norm1_weight = to_vector(fetch(weights, p + "attention_norm.weight", {H}));
    L.norm1_bias = to_vector(fetch(weights, p + "attention_norm.bias", {H}));
    L.norm2_weight = to_vector(fetch(weights, p + "ffn_norm.weight", {H}));
    L.norm2_bias = to_vector(fetch(weights, p + "ffn_norm.bias", {H}));
    layers_.push_back(std::move(L));
  }
  const int64_t n_exits = c.num_layers - c.exit_start + 1;
  for (int64_t i = 0; i < n_exits; ++i) {
    const std::string p = "exits." + std::to_string(i) + ".";
    ExitWeights X;
    X.has_pooler = i == n_exits - 1 || c.exit_pooler_dense;
    X.activation = X.has_pooler ? c.pooler_activation : Activation::kTanh;
    if (X.has_pooler) {
      X.pooler = PackedLinear(fetch(weights, p + "pooler.weight", {H, H}), fetch(weights, p + "pooler.bias", {H}), precision_, p + "pooler.weight");
    }
    X.classifier_weight = to_vector(fetch(weights, p + "classifier.weight", {c.num_labels, H}));
    X.classifier_bias = to_vector(fetch(weights, p + "classifier.bias", {c.num_labels}));
    exits_.push_back(std::move(X));
  }
}

c10::intrusive_ptr<InferenceEngine> InferenceEngine::from_directory(const std::string& path, const std::string& precision, const std::string& isa) {
  std::ifstream cf(path + "/config.json");
  TORCH_CHECK_VALUE(cf.good(), "costeff engine: ", path, "/config.json not found: pass a costeff model directory (config.json + model.safetensors)");
  std::stringstream text;
  text << cf.rdbuf();
  EngineConfig::from_json(text.str());  // a wrong config is reported before the weights are read
  const std::string weights_path = path + "/model.safetensors";
  TORCH_CHECK_VALUE(std::ifstream(weights_path).good(), "costeff engine: ", weights_path, " not found (sharded or pickled checkpoints are not read here)");
  return c10::make_intrusive<InferenceEngine>(load_safetensors(weights_path), text.str(), precision, isa);
}
}  // namespace costeff::engine
