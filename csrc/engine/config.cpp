// EngineConfig::from_json: the fields of a costeff config.json the engine needs (see engine.h).
#include <c10/util/Exception.h>

#include <stdexcept>

#include "engine.h"
#include "json.h"

namespace costeff::engine {
namespace {

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

}  // namespace

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
}  // namespace costeff::engine
