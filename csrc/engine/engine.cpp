// The one-call early-exit inference engine (see engine.h).
#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "../cpu/shared_rows.h"
#include "costeff/exit_head.h"
#include "json.h"

namespace costeff::engine {
namespace {

// Multiply-adds below which a linear layer runs on the calling thread: a fork/join costs a few us.
constexpr int64_t kParallelMacs = int64_t(1) << 18;
// Elements below which per-row work (activation preparation, LayerNorm) stays on the calling thread.
constexpr int64_t kParallelElements = int64_t(1) << 15;

std::vector<int64_t> per_layer(const json::Value& cfg, const std::string& key, int64_t layers) {
  const json::Value& v = cfg.at(key, "config." + key);
  std::vector<int64_t> out;
  if (v.kind == json::Value::Kind::kArray) {
    for (size_t i = 0; i < v.array.size(); ++i) out.push_back(v.array[i].as_int("config." + key + "[" + std::to_string(i) + "]"));
  } else {
    out.assign(layers, v.as_int("config." + key));
  }
  if (static_cast<int64_t>(out.size()) != layers)
    throw std::runtime_error("config." + key + " has " + std::to_string(out.size()) + " entries but num_hidden_layers is " + std::to_string(layers));
  for (int64_t x : out)
    if (x < 0) throw std::runtime_error("config." + key + " holds a negative size");
  return out;
}

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

// Per-call scratch (the engine itself is never written during run()).
struct Scratch {
  std::vector<float> rounded;
  std::vector<int8_t> q;
  std::vector<float> scale;
};

// y = act(x W^T + b) for M rows, parallel over output panels (and row chunks when panels are few).
void run_linear(const PackedLinear& lin, Isa isa, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, Activation act, Scratch& s) {
  if (M == 0 || lin.out_features() == 0) return;
  PreparedInput in;
  in.f32 = x;
  in.stride = ldx;
  const int64_t K = lin.in_features();
  if (lin.precision() != Precision::kFloat32) {
    float* rounded = nullptr;
    int8_t* q = nullptr;
    if (lin.precision() == Precision::kBFloat16) {
      s.rounded.resize(std::max<size_t>(s.rounded.size(), M * ldx));
      rounded = s.rounded.data();
      in.f32 = rounded;
    } else {
      s.q.resize(std::max<size_t>(s.q.size(), M * lin.quantized_stride()));
      s.scale.resize(std::max<size_t>(s.scale.size(), M));
      q = s.q.data();
      in.q = q;
      in.scale = s.scale.data();
      in.stride = lin.quantized_stride();
    }
    float* scale = s.scale.data();
    const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, K));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) { lin.prepare_rows(isa, x, ldx, m0, m1, rounded, q, scale); });
  }
  const int64_t P = lin.panels();
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || M * lin.macs_per_row() < kParallelMacs || at::in_parallel_region()) {
    lin.run(isa, in, 0, M, 0, P, y, ldy, act);
    return;
  }
  const int64_t row_chunks = P >= 2 * threads ? 1 : std::min<int64_t>((2 * threads + P - 1) / P, (M + 5) / 6);
  const int64_t chunk = (M + row_chunks - 1) / row_chunks;
  at::parallel_for(0, P * row_chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / row_chunks, rc = t % row_chunks;
      const int64_t m0 = rc * chunk, m1 = std::min(M, m0 + chunk);
      lin.run(isa, in, m0, m1, p, p + 1, y, ldy, act);
    }
  });
}

// out[r] = LayerNorm(x[r] + res[r]) for M rows of n.
void layer_norm_rows(Isa isa, const float* x, const float* res, const std::vector<float>& g, const std::vector<float>& b,
                     float* out, int64_t M, int64_t n, float eps) {
  const bool avx2 = isa == Isa::kAvx2;
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, n));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) add_layer_norm_row_cpu(x + r * n, res + r * n, g.data(), b.data(), out + r * n, n, eps, avx2);
  });
}

// The portable attention (the AVX2 one is attention_core_avx2 of csrc/cpu/slim_attention.cpp).
void attention_portable(const AttentionRows& rows, const float* qkv, int64_t ld, float* ctx, int64_t nh, int64_t d) {
  const int64_t inner = nh * d;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, rows.batch * nh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(rows.max_len);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nh, h = bh % nh;
      const int64_t n = rows.n_keys[b];
      const int64_t* keys = rows.key_rows + b * rows.max_len;
      for (int64_t i = 0; i < rows.q_len[b]; ++i) {
        const int64_t row = rows.q_start[b] + i;
        float* out = ctx + row * inner + h * d;
        std::fill(out, out + d, 0.f);
        if (n == 0) continue;
        const float* q = qkv + row * ld + h * d;
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          const float* k = qkv + keys[t] * ld + inner + h * d;
          float dot = 0.f;
          for (int64_t c = 0; c < d; ++c) dot += q[c] * k[c];
          p[t] = dot * scale;
          mx = std::max(mx, p[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += (p[t] = std::exp(p[t] - mx));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) {
          const float* v = qkv + keys[t] * ld + 2 * inner + h * d;
          const float w = p[t] * inv;
          for (int64_t c = 0; c < d; ++c) out[c] += w * v[c];
        }
      }
    }
  });
}

// Accumulates seconds per stage name into a profile map; free when the map is null.
class StageClock {
 public:
  explicit StageClock(std::map<std::string, double>* out) : out_(out), last_(std::chrono::steady_clock::now()) {}
  void lap(const std::string& prefix, const char* stage = "") {
    if (out_ == nullptr) return;
    const auto now = std::chrono::steady_clock::now();
    (*out_)[prefix + stage] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  std::map<std::string, double>* out_;
  std::chrono::steady_clock::time_point last_;
};

// One active input row: its original index, its token rows [start, start + len) in the hidden state
// and the local indices of its real tokens (the keys, and what mean pooling averages).
struct Row {
  int64_t index;
  int64_t start;
  int64_t len;
  std::vector<int64_t> keys;
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Config

EngineConfig EngineConfig::from_json(const std::string& text) {
  try {
    const json::Value cfg = json::parse(text);
    TORCH_CHECK_VALUE(cfg.kind == json::Value::Kind::kObject, "costeff engine: the config must be a JSON object");
    const std::string model_type = cfg.has("model_type") ? cfg.at("model_type", "config").as_string("config.model_type") : "";
    TORCH_CHECK_VALUE(model_type == "costeff_bert", "costeff engine: config.model_type is '", model_type,
                      "', not 'costeff_bert': convert the model with costeff.models.from_bert first");
    EngineConfig c;
    c.vocab_size = cfg.at("vocab_size", "config").as_int("config.vocab_size");
    c.hidden_size = cfg.at("hidden_size", "config").as_int("config.hidden_size");
    c.num_layers = cfg.at("num_hidden_layers", "config").as_int("config.num_hidden_layers");
    c.max_positions = cfg.at("max_position_embeddings", "config").as_int("config.max_position_embeddings");
    c.type_vocab_size = cfg.at("type_vocab_size", "config").as_int("config.type_vocab_size");
    c.layer_norm_eps = cfg.at("layer_norm_eps", "config").as_double("config.layer_norm_eps");
    if (cfg.has("id2label") && !cfg.at("id2label", "config").is_null()) {
      c.num_labels = static_cast<int64_t>(cfg.at("id2label", "config").object.size());
    } else if (cfg.has("num_labels")) {
      c.num_labels = cfg.at("num_labels", "config").as_int("config.num_labels");
    } else {
      c.num_labels = 2;  // transformers' default, which save_pretrained leaves out of config.json
    }
    TORCH_CHECK_VALUE(c.vocab_size > 0 && c.hidden_size > 0 && c.num_layers > 0 && c.max_positions > 0 && c.type_vocab_size > 0 && c.num_labels > 0,
                      "costeff engine: config sizes (vocab_size, hidden_size, num_hidden_layers, max_position_embeddings, type_vocab_size, labels) must be positive");
    TORCH_CHECK_VALUE(c.layer_norm_eps > 0, "costeff engine: config.layer_norm_eps must be > 0");
    c.heads = per_layer(cfg, "num_attention_heads", c.num_layers);
    c.head_size = per_layer(cfg, "attention_head_size", c.num_layers);
    c.ffn = per_layer(cfg, "intermediate_size", c.num_layers);
    const json::Value& rank = cfg.has("embedding_rank") ? cfg.at("embedding_rank", "config") : json::Value();
    c.embedding_rank = rank.is_null() ? 0 : rank.as_int("config.embedding_rank");
    TORCH_CHECK_VALUE(c.embedding_rank >= 0, "costeff engine: config.embedding_rank must be positive or null");
    c.exit_start = cfg.has("exit_start") ? cfg.at("exit_start", "config").as_int("config.exit_start") : 1;
    TORCH_CHECK_VALUE(c.exit_start >= 1 && c.exit_start <= c.num_layers, "costeff engine: config.exit_start must be in [1, num_hidden_layers]");
    c.exit_pooler_dense = cfg.has("exit_pooler_dense") && cfg.at("exit_pooler_dense", "config").as_bool("config.exit_pooler_dense");
    const std::string pooling = cfg.has("exit_pooling") ? cfg.at("exit_pooling", "config").as_string("config.exit_pooling") : "cls";
    TORCH_CHECK_VALUE(pooling == "cls" || pooling == "mean", "costeff engine: config.exit_pooling must be 'cls' or 'mean', got '", pooling, "'");
    c.mean_pooling = pooling == "mean";
    const std::string pooler_act =
        cfg.has("pooler_activation") ? cfg.at("pooler_activation", "config").as_string("config.pooler_activation") : "tanh";
    TORCH_CHECK_VALUE(pooler_act == "tanh" || pooler_act == "relu" || pooler_act == "gelu",
                      "costeff engine: config.pooler_activation must be 'tanh', 'relu' or 'gelu', got '", pooler_act, "'");
    const json::Value& offset = cfg.has("position_offset") ? cfg.at("position_offset", "config") : json::Value();
    c.position_offset = offset.is_null() ? 0 : offset.as_int("config.position_offset");
    TORCH_CHECK_VALUE(c.position_offset >= 0 && c.position_offset < c.max_positions,
                      "costeff engine: config.position_offset must be null or in [1, max_position_embeddings)");
    const json::Value& pruned = cfg.has("pruned_vocab_size") ? cfg.at("pruned_vocab_size", "config") : json::Value();
    c.pruned_vocab_size = pruned.is_null() ? 0 : pruned.as_int("config.pruned_vocab_size");
    TORCH_CHECK_VALUE(c.pruned_vocab_size >= 0 && c.pruned_vocab_size <= c.vocab_size,
                      "costeff engine: config.pruned_vocab_size must be null or in [1, vocab_size]");
    const json::Value& emb_size = cfg.has("embedding_size") ? cfg.at("embedding_size", "config") : json::Value();
    c.embedding_size = emb_size.is_null() ? 0 : emb_size.as_int("config.embedding_size");
    TORCH_CHECK_VALUE(c.embedding_size >= 0, "costeff engine: config.embedding_size must be positive or null");
    c.pooler_activation = pooler_act == "relu" ? Activation::kRelu : pooler_act == "gelu" ? Activation::kGelu : Activation::kTanh;
    if (cfg.has("hidden_act")) {
      const std::string act = cfg.at("hidden_act", "config").as_string("config.hidden_act");
      TORCH_CHECK_VALUE(act == "gelu", "costeff engine: config.hidden_act must be 'gelu', got '", act, "'");
    }
    return c;
  } catch (const std::runtime_error& e) {
    TORCH_CHECK_VALUE(false, "costeff engine: bad config: ", e.what());
  }
}

// ------------------------------------------------------------------------------------------------
// Construction

InferenceEngine::InferenceEngine(const c10::Dict<std::string, at::Tensor>& weights, const std::string& config_json, const std::string& precision)
    : config_(EngineConfig::from_json(config_json)), precision_(parse_precision(precision)), isa_(select_isa()) {
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

// ------------------------------------------------------------------------------------------------
// Inference

std::tuple<at::Tensor, at::Tensor, at::Tensor> InferenceEngine::run(
    const at::Tensor& input_ids,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& token_type_ids,
    double threshold,
    std::map<std::string, double>* profile) const {
  StageClock clock(profile);
  const EngineConfig& c = config_;
  const int64_t H = c.hidden_size, C = c.num_labels;
  // ---- input checks (the same rules as prepare_inputs in modeling_costeff.py)
  TORCH_CHECK_VALUE(input_ids.defined(), "costeff engine: input_ids is undefined");
  TORCH_CHECK_VALUE(input_ids.device().is_cpu(), "costeff engine: input_ids must be a CPU tensor, got ", input_ids.device());
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "costeff engine: input_ids must be 2-D [batch, seq_len], got shape ", input_ids.sizes());
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
                   "costeff engine: input_ids must be int64 or int32, got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(!std::isnan(threshold), "costeff engine: threshold must not be NaN");
  const int64_t B = input_ids.size(0), S = input_ids.size(1);
  auto logits_out = at::zeros({B, C}, at::kFloat);
  auto layer_out = at::zeros({B}, at::kLong);
  auto entropy_out = at::zeros({B}, at::kFloat);
  if (B == 0) return {logits_out, layer_out, entropy_out};
  TORCH_CHECK_VALUE(S > 0, "costeff engine: input_ids has seq_len 0: every row needs at least one token ([CLS])");
  TORCH_CHECK_VALUE(S <= c.max_positions - c.position_offset, "costeff engine: input_ids has seq_len ", S,
                    " but the position table holds max_position_embeddings=", c.max_positions,
                    c.position_offset ? " from position_offset=" + std::to_string(c.position_offset) : std::string(),
                    ": at most ", c.max_positions - c.position_offset, " tokens; truncate the input");
  const auto ids = input_ids.to(at::kLong).contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * S; ++i)
    TORCH_CHECK_VALUE(idp[i] >= 0 && idp[i] < c.vocab_size, "costeff engine: input_ids must be in [0, vocab_size=", c.vocab_size, "), got ",
                      idp[i], " at row ", i / S, " column ", i % S);
  std::vector<uint8_t> real(B * S, 1);
  if (attention_mask.has_value() && attention_mask->defined()) {
    const at::Tensor& m = *attention_mask;
    TORCH_CHECK_VALUE(m.device().is_cpu(), "costeff engine: attention_mask must be a CPU tensor, got ", m.device());
    TORCH_CHECK_VALUE(m.sizes() == input_ids.sizes(), "costeff engine: attention_mask must have the shape of input_ids ", input_ids.sizes(), ", got ", m.sizes());
    TORCH_CHECK_TYPE(!m.is_complex(), "costeff engine: attention_mask must be bool, integer or float");
    const auto md = m.to(at::kDouble).contiguous();
    const double* mp = md.data_ptr<double>();
    for (int64_t i = 0; i < B * S; ++i) {
      TORCH_CHECK_VALUE(mp[i] == 0.0 || mp[i] == 1.0, "costeff engine: attention_mask must hold 0/1 (1 = real token), got ", mp[i], " at row ", i / S,
                        " column ", i % S, "; additive masks are not accepted");
      real[i] = mp[i] == 1.0;
    }
  }
  std::vector<int64_t> types(B * S, 0);
  if (token_type_ids.has_value() && token_type_ids->defined()) {
    const at::Tensor& t = *token_type_ids;
    TORCH_CHECK_VALUE(t.device().is_cpu(), "costeff engine: token_type_ids must be a CPU tensor, got ", t.device());
    TORCH_CHECK_VALUE(t.sizes() == input_ids.sizes(), "costeff engine: token_type_ids must have the shape of input_ids ", input_ids.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, "costeff engine: token_type_ids must be an integer tensor, got ", t.scalar_type());
    const auto td = t.to(at::kLong).contiguous();
    std::copy(td.data_ptr<int64_t>(), td.data_ptr<int64_t>() + B * S, types.begin());
    for (int64_t i = 0; i < B * S; ++i)
      TORCH_CHECK_VALUE(types[i] >= 0 && types[i] < c.type_vocab_size, "costeff engine: token_type_ids must be in [0, type_vocab_size=", c.type_vocab_size,
                        "), got ", types[i], " at row ", i / S, " column ", i % S);
  }

  clock.lap("checks");
  // ---- unpadded token rows: real tokens, plus position 0 (the CLS exit reads it even as padding)
  std::vector<Row> rows;
  rows.reserve(B);
  std::vector<int64_t> tok_pos, pos_id;  // flat input index and position-table row of every kept token
  tok_pos.reserve(B * S);
  pos_id.reserve(B * S);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    Row r{b, T, 0, {}};
    int64_t seen = 0;  // real tokens so far in this row (RoBERTa-style positions)
    for (int64_t j = 0; j < S; ++j) {
      const bool is_real = real[b * S + j];
      if (!is_real && j != 0) continue;
      if (is_real) {
        r.keys.push_back(r.len);
        ++seen;
      }
      tok_pos.push_back(b * S + j);
      pos_id.push_back(c.position_offset == 0 ? j : c.position_offset - 1 + (is_real ? seen : 0));
      ++r.len;
    }
    TORCH_CHECK_VALUE(!r.keys.empty(), "costeff engine: attention_mask row ", b, " has no real token (all padding); remove it from the batch");
    T += r.len;
    rows.push_back(std::move(r));
  }

  // ---- embeddings: LayerNorm((word [projected] + position) + token type), as CostEffEmbeddings
  Scratch scratch;
  std::vector<float> h(T * H), h1(T * H), tmp(T * H);
  {
    const int64_t E = c.embedding_size > 0 ? c.embedding_size : H;  // width of the tables and their LayerNorm
    const int64_t wd = c.embedding_rank > 0 ? c.embedding_rank : E;
    std::vector<float> words(T * wd), x;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = idp[tok_pos[t]];
      const int64_t row = token_id_map_.empty() ? id : token_id_map_[id];
      std::memcpy(&words[t * wd], &word_embeddings_[row * wd], wd * sizeof(float));
    }
    if (c.embedding_rank > 0) {
      x.resize(T * E);
      run_linear(word_projection_, isa_, words.data(), wd, T, x.data(), E, Activation::kNone, scratch);
    } else {
      x.swap(words);
    }
    std::vector<float> normed(c.embedding_size > 0 ? T * E : 0);
    float* out = c.embedding_size > 0 ? normed.data() : h.data();
    for (int64_t t = 0; t < T; ++t) {
      const float* pos = &position_embeddings_[pos_id[t] * E];
      const float* type = &token_type_embeddings_[types[tok_pos[t]] * E];
      float* xt = &x[t * E];
      for (int64_t i = 0; i < E; ++i) xt[i] += pos[i];
      add_layer_norm_row_cpu(xt, type, embed_norm_weight_.data(), embed_norm_bias_.data(), &out[t * E], E, static_cast<float>(c.layer_norm_eps), isa_ == Isa::kAvx2);
    }
    if (c.embedding_size > 0) run_linear(embedding_projection_, isa_, normed.data(), E, T, h.data(), H, Activation::kNone, scratch);
  }
  clock.lap("embeddings");

  const float eps = static_cast<float>(c.layer_norm_eps);
  std::vector<float> qkv, ctx, mid, pooled, logits(C);
  std::vector<int64_t> key_rows, q_start, q_len, n_keys;
  float* lo = logits_out.data_ptr<float>();
  int64_t* lay = layer_out.data_ptr<int64_t>();
  float* ent = entropy_out.data_ptr<float>();
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& L = layers_[l];
    const int64_t inner = L.heads * L.head_size;
    const std::string tag = profile != nullptr ? "layer" + std::to_string(l + 1) + "." : "";
    // ---- attention + add&norm
    if (inner > 0) {
      qkv.resize(T * 3 * inner);
      ctx.resize(T * inner);
      run_linear(L.qkv, isa_, h.data(), H, T, qkv.data(), 3 * inner, Activation::kNone, scratch);
      clock.lap(tag, "qkv");
      const int64_t R = static_cast<int64_t>(rows.size());
      int64_t max_len = 0;
      for (const Row& r : rows) max_len = std::max(max_len, r.len);
      key_rows.assign(R * max_len, 0);
      q_start.resize(R);
      q_len.resize(R);
      n_keys.resize(R);
      for (int64_t b = 0; b < R; ++b) {
        q_start[b] = rows[b].start;
        q_len[b] = rows[b].len;
        n_keys[b] = static_cast<int64_t>(rows[b].keys.size());
        for (int64_t t = 0; t < n_keys[b]; ++t) key_rows[b * max_len + t] = rows[b].start + rows[b].keys[t];
      }
      const AttentionRows ar{q_start.data(), q_len.data(), key_rows.data(), n_keys.data(), R, max_len};
#if COSTEFF_HAVE_AVX2_PATH
      if (isa_ == Isa::kAvx2) {
        attention_core_avx2(ar, qkv.data(), 3 * inner, qkv.data() + inner, qkv.data() + 2 * inner, 3 * inner, ctx.data(), L.heads, L.head_size);
      } else
#endif
      {
        attention_portable(ar, qkv.data(), 3 * inner, ctx.data(), L.heads, L.head_size);
      }
      clock.lap(tag, "attention");
      run_linear(L.attn_out, isa_, ctx.data(), inner, T, tmp.data(), H, Activation::kNone, scratch);
    } else {
      for (int64_t t = 0; t < T; ++t) std::copy(L.attn_out_bias.begin(), L.attn_out_bias.end(), tmp.begin() + t * H);
    }
    clock.lap(tag, "attn_out");
    layer_norm_rows(isa_, tmp.data(), h.data(), L.norm1_weight, L.norm1_bias, h1.data(), T, H, eps);
    clock.lap(tag, "norm1");
    // ---- FFN + add&norm
    if (L.ffn > 0) {
      mid.resize(T * L.ffn);
      run_linear(L.ffn_in, isa_, h1.data(), H, T, mid.data(), L.ffn, Activation::kGelu, scratch);
      clock.lap(tag, "ffn_in");
      run_linear(L.ffn_out, isa_, mid.data(), L.ffn, T, tmp.data(), H, Activation::kNone, scratch);
    } else {
      for (int64_t t = 0; t < T; ++t) std::copy(L.ffn_out_bias.begin(), L.ffn_out_bias.end(), tmp.begin() + t * H);
    }
    clock.lap(tag, "ffn_out");
    layer_norm_rows(isa_, tmp.data(), h1.data(), L.norm2_weight, L.norm2_bias, h.data(), T, H, eps);
    clock.lap(tag, "norm2");

    // ---- exit
    const int64_t layer = l + 1;
    if (layer < c.exit_start) continue;
    const ExitWeights& X = exits_[layer - c.exit_start];
    const bool last = layer == c.num_layers;
    const int64_t R = static_cast<int64_t>(rows.size());
    pooled.resize(R * H);
    for (int64_t b = 0; b < R; ++b) {
      float* dst = &pooled[b * H];
      const Row& r = rows[b];
      if (last || !c.mean_pooling) {
        std::memcpy(dst, &h[r.start * H], H * sizeof(float));
      } else {
        std::fill(dst, dst + H, 0.f);
        for (int64_t t : r.keys) {
          const float* src = &h[(r.start + t) * H];
          for (int64_t i = 0; i < H; ++i) dst[i] += src[i];
        }
        const float count = static_cast<float>(r.keys.size());
        for (int64_t i = 0; i < H; ++i) dst[i] /= count;
      }
    }
    if (X.has_pooler) {
      run_linear(X.pooler, isa_, pooled.data(), H, R, tmp.data(), H, X.activation, scratch);
      std::copy(tmp.begin(), tmp.begin() + R * H, pooled.begin());
    } else {
      tanh_rows(isa_, pooled.data(), R * H);
    }
    std::vector<Row> stay;
    int64_t new_T = 0;
    for (int64_t b = 0; b < R; ++b) {
      const float* x = &pooled[b * H];
      EntropyState state = entropy_state_empty();
      for (int64_t k = 0; k < C; ++k) {
        const float* w = &X.classifier_weight[k * H];
        float acc = 0.f;
        for (int64_t i = 0; i < H; ++i) acc += x[i] * w[i];
        logits[k] = acc + X.classifier_bias[k];
        TORCH_CHECK_VALUE(std::isfinite(logits[k]), "costeff engine: non-finite logits (NaN/Inf) at layer ", layer, " for input row ", rows[b].index);
        state = entropy_state_add(state, logits[k]);
      }
      const float entropy = entropy_state_finalize(state);
      Row& r = rows[b];
      if (last || exit_decision(entropy, static_cast<float>(threshold))) {
        std::copy(logits.begin(), logits.end(), lo + r.index * C);
        lay[r.index] = layer;
        ent[r.index] = entropy;
        continue;
      }
      if (r.start != new_T) std::memmove(&h[new_T * H], &h[r.start * H], r.len * H * sizeof(float));
      r.start = new_T;
      new_T += r.len;
      stay.push_back(std::move(r));
    }
    rows.swap(stay);
    T = new_T;
    clock.lap(tag, "exit");
    if (rows.empty()) break;
  }
  return {logits_out, layer_out, entropy_out};
}

// ------------------------------------------------------------------------------------------------
// Model directory (config.json + model.safetensors)

c10::Dict<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK_VALUE(f.good(), "costeff engine: cannot open ", path);
  f.seekg(0, std::ios::end);
  const int64_t size = f.tellg();
  f.seekg(0);
  TORCH_CHECK_VALUE(size >= 8, "costeff engine: ", path, " is not a safetensors file (", size, " bytes)");
  uint64_t header_len = 0;
  unsigned char len_bytes[8];
  f.read(reinterpret_cast<char*>(len_bytes), 8);
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  TORCH_CHECK_VALUE(header_len <= static_cast<uint64_t>(size - 8), "costeff engine: ", path, " has a header length past the end of the file");
  std::string header(header_len, '\0');
  f.read(header.data(), header_len);
  json::Value meta;
  try {
    meta = json::parse(header);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK_VALUE(false, "costeff engine: ", path, " has a corrupt safetensors header: ", e.what());
  }
  TORCH_CHECK_VALUE(meta.kind == json::Value::Kind::kObject, "costeff engine: ", path, ": the safetensors header is not an object");
  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  c10::Dict<std::string, at::Tensor> out;
  for (const auto& [name, info] : meta.object) {
    if (name == "__metadata__") continue;
    try {
      const std::string& dtype = info.at("dtype", name).as_string(name + ".dtype");
      std::vector<int64_t> shape;
      for (const auto& d : info.at("shape", name).array) shape.push_back(d.as_int(name + ".shape"));
      const auto& offsets = info.at("data_offsets", name).array;
      if (offsets.size() != 2) throw std::runtime_error(name + ".data_offsets must hold 2 numbers");
      const int64_t begin = offsets[0].as_int(name + ".data_offsets"), end = offsets[1].as_int(name + ".data_offsets");
      at::ScalarType st;
      if (dtype == "F32") st = at::kFloat;
      else if (dtype == "F16") st = at::kHalf;
      else if (dtype == "BF16") st = at::kBFloat16;
      else if (dtype == "F64") st = at::kDouble;
      else if (dtype == "I64") st = at::kLong;
      else if (dtype == "I32") st = at::kInt;
      else if (dtype == "BOOL") st = at::kBool;
      else throw std::runtime_error(name + " has unsupported dtype " + dtype);
      int64_t numel = 1;
      for (int64_t d : shape) {
        if (d < 0) throw std::runtime_error(name + " has a negative dimension");
        numel *= d;
      }
      const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(st));
      if (begin < 0 || end - begin != nbytes || data_start + end > size)
        throw std::runtime_error(name + ": data_offsets do not match its shape and dtype or run past the end of the file");
      auto t = at::empty(shape, at::TensorOptions().dtype(st));
      f.seekg(data_start + begin);
      f.read(static_cast<char*>(t.data_ptr()), nbytes);
      if (!f.good() && nbytes > 0) throw std::runtime_error(name + ": truncated data");
      out.insert(name, t);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK_VALUE(false, "costeff engine: ", path, ": ", e.what());
    }
  }
  return out;
}

c10::intrusive_ptr<InferenceEngine> InferenceEngine::from_directory(const std::string& path, const std::string& precision) {
  std::ifstream cf(path + "/config.json");
  TORCH_CHECK_VALUE(cf.good(), "costeff engine: ", path, "/config.json not found: pass a costeff model directory (config.json + model.safetensors)");
  std::stringstream text;
  text << cf.rdbuf();
  EngineConfig::from_json(text.str());  // a wrong config is reported before the weights are read
  const std::string weights_path = path + "/model.safetensors";
  TORCH_CHECK_VALUE(std::ifstream(weights_path).good(), "costeff engine: ", weights_path, " not found (sharded or pickled checkpoints are not read here)");
  return c10::make_intrusive<InferenceEngine>(load_safetensors(weights_path), text.str(), precision);
}

// ------------------------------------------------------------------------------------------------
// Registration

void register_engine(torch::Library& m) {
  m.class_<InferenceEngine>("InferenceEngine")
      .def(torch::init<c10::Dict<std::string, at::Tensor>, std::string, std::string>())
      .def_static("from_directory", [](std::string path, std::string precision) { return InferenceEngine::from_directory(path, precision); })
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
}

}  // namespace costeff::engine
