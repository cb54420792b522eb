#pragma once
// The one-call early-exit inference engine: the whole `CostEffForSequenceClassification.early_exit`
// (python/costeff/models/modeling_costeff.py, its readable reference) in C++, on weights packed once.
//
// Rows are stored unpadded: each input row keeps its real tokens (and position 0, which the CLS exit
// reads even when it is padding), so padding costs nothing and trailing-padding trimming is implicit;
// rows that exit are written out and the rest are compacted before the next layer. Attention, LayerNorm,
// softmax and entropy run in fp32; the linear layers (QKV, attention output, FFN, embedding projection,
// poolers) in the engine's precision (packed_linear.h); exit classifiers in fp32.
//
// The engine is immutable after construction and run() keeps all scratch local, so one engine may be
// called from several threads at once. Parallel work follows at::get_num_threads().
#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "linear/packed_linear.h"

namespace costeff::engine {

// The fields of a costeff config.json (CostEffConfig) the engine needs.
struct EngineConfig {
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, max_positions = 0, type_vocab_size = 0, num_labels = 0;
  int64_t embedding_rank = 0;  // 0: plain vocab x hidden word embedding
  int64_t pruned_vocab_size = 0;  // 0: one word row per token id; n: n rows, token_id_map picks the row
  int64_t exit_start = 1;
  bool exit_pooler_dense = false;
  bool mean_pooling = false;  // exit_pooling == "mean" (intermediate exits)
  Activation pooler_activation = Activation::kTanh;  // after an exit's pooler dense
  int64_t embedding_size = 0;   // 0: tables are hidden wide; e: e wide, then a projection to hidden (ELECTRA)
  int64_t position_offset = 0;  // 0: positions are column indices; p: RoBERTa-style, p - 1 + k for the k-th real token
  double layer_norm_eps = 1e-12;
  std::vector<int64_t> heads, head_size, ffn;

  // From the JSON text of a config.json / CostEffConfig.to_json_string(); throws c10::ValueError naming
  // the field on anything missing, malformed or not a costeff model.
  static EngineConfig from_json(const std::string& text);
};

struct LayerWeights {
  int64_t heads = 0, head_size = 0, ffn = 0;
  PackedLinear qkv, attn_out, ffn_in, ffn_out;
  std::vector<float> attn_out_bias, ffn_out_bias;  // used alone when heads == 0 / ffn == 0
  std::vector<float> norm1_weight, norm1_bias, norm2_weight, norm2_bias;
};

struct ExitWeights {
  bool has_pooler = false;
  Activation activation = Activation::kTanh;  // pooler_activation with a pooler, tanh without
  PackedLinear pooler;
  std::vector<float> classifier_weight;  // [num_labels, hidden], fp32
  std::vector<float> classifier_bias;
};

// Rows of unpadded tokens: row r's tokens are rows [start, start + len) of `h` ([tokens, hidden]),
// `keys` the local indices of its real tokens (what attention reads and mean pooling averages).
// `index` names the row to its owner: the input row in run(), a slot in an EngineSession.
struct TokenRow {
  int64_t index = 0;
  int64_t start = 0;
  int64_t len = 0;
  std::vector<int64_t> keys;
};

struct RowBatch {
  std::vector<TokenRow> rows;
  std::vector<float> h;
  int64_t tokens = 0;
  // Moves `other`'s rows and states to the end of this batch (rows keep their index).
  void append(RowBatch&& other, int64_t hidden);
};

// Scratch buffers reused across layers and exits of one call (never shared between threads).
struct Workspace {
  std::vector<float> h1, tmp, qkv, ctx, mid, pooled;
  std::vector<int64_t> key_rows, q_start, q_len, n_keys;
  std::vector<uint16_t> bf16;
  std::vector<int8_t> q;
  std::vector<float> scale;
};

// Called per row at an exit with its logits [num_labels] and entropy: true if the row leaves there.
using ExitDecision = std::function<bool(const TokenRow& row, const float* logits, float entropy)>;

class InferenceEngine : public torch::CustomClassHolder {
 public:
  // `weights`: the state_dict of a CostEffForSequenceClassification (names as in model.safetensors);
  // `config_json`: its config; `precision`: "fp32" | "bf16" | "int8". Checks every tensor's presence,
  // shape and finiteness against the config and names the first that is wrong. `isa`: the kernels'
  // instruction set (linear/kernels.h); empty reads COSTEFF_ENGINE_ISA, else the CPU's best.
  InferenceEngine(const c10::Dict<std::string, at::Tensor>& weights, const std::string& config_json, const std::string& precision,
                  const std::string& isa = "");

  // Builds from a model directory: config.json + model.safetensors (no Python needed).
  static c10::intrusive_ptr<InferenceEngine> from_directory(const std::string& path, const std::string& precision, const std::string& isa = "");

  // Entropy early exit as `early_exit`: returns (logits [B, num_labels] fp32, exit_layer [B] int64
  // (1-based), entropy [B] fp32 (nats)), rows in input order. input_ids: int64/int32 [B, S];
  // attention_mask: optional 0/1 [B, S] (bool, integer or float); token_type_ids: optional integer [B, S].
  // `profile`, when given, accumulates wall-clock seconds per stage ("embeddings", "layer3.qkv",
  // "layer3.attention", "layer3.attn_out", "layer3.norm1", "layer3.ffn_in", "layer3.ffn_out",
  // "layer3.norm2", "layer3.exit", "checks").
  std::tuple<at::Tensor, at::Tensor, at::Tensor> run(
      const at::Tensor& input_ids,
      const std::optional<at::Tensor>& attention_mask,
      const std::optional<at::Tensor>& token_type_ids,
      double threshold,
      std::map<std::string, double>* profile = nullptr) const;

  // The building blocks of run(), also used by EngineSession (continuous batching, session.cpp):
  // embed() checks the inputs as run() does and returns their rows (index = input row) after the
  // embeddings; layer() runs layer l (0-based) on every row of `batch` in place; exit() runs the exit
  // after layer l on every row, asks `leave` per row and compacts the rows that stay.
  RowBatch embed(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& token_type_ids,
                 Workspace& ws, std::map<std::string, double>* profile = nullptr) const;
  void layer(int64_t l, RowBatch& batch, Workspace& ws, std::map<std::string, double>* profile = nullptr) const;
  void exit(int64_t l, RowBatch& batch, const ExitDecision& leave, Workspace& ws, std::map<std::string, double>* profile = nullptr) const;
  // Whether layer l (0-based) has an exit after it.
  bool has_exit(int64_t l) const { return l + 1 >= config_.exit_start; }

  std::string precision() const { return precision_name(precision_); }
  std::string isa() const { return kern_->name; }
  int64_t num_labels() const { return config_.num_labels; }
  int64_t num_layers() const { return config_.num_layers; }
  const EngineConfig& config() const { return config_; }

 private:
  EngineConfig config_;
  Precision precision_;
  const LinearKernels* kern_;  // chosen once, at construction (COSTEFF_ENGINE_ISA or the CPU's best)
  std::vector<float> word_embeddings_;  // [vocab or pruned_vocab_size, rank or hidden]
  std::vector<int64_t> token_id_map_;   // [vocab] token id -> word row; empty: the id is the row
  PackedLinear word_projection_;        // rank -> embedding width when factorized
  PackedLinear embedding_projection_;   // embedding_size -> hidden (ELECTRA), after the embedding LayerNorm
  std::vector<float> position_embeddings_, token_type_embeddings_, embed_norm_weight_, embed_norm_bias_;
  std::vector<LayerWeights> layers_;
  std::vector<ExitWeights> exits_;  // exits_[i] follows layer exit_start + i (1-based)
};

// Reads a safetensors file into name -> CPU tensor (F32/F16/BF16/F64/I64/I32/BOOL); throws c10::ValueError
// naming the file on a malformed header or truncated data.
c10::Dict<std::string, at::Tensor> load_safetensors(const std::string& path);

// Adds the engine's custom class (torch.classes.costeff.InferenceEngine) and its helper ops to the
// library; called from the single TORCH_LIBRARY(costeff, m) block in csrc/registration.cpp.
void register_engine(torch::Library& m);

}  // namespace costeff::engine
