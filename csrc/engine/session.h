#pragma once
// Continuous batching at layer granularity over one InferenceEngine (docs/serve.md): rows are admitted
// at any time; each step() takes every row in flight one layer deeper (rows at the same depth run as
// one batch through that layer's weights), and a row leaves at its first exit whose entropy is below
// its own threshold. Finished rows come back from the step that finished them, so a request is done
// when its own rows are, not when the deepest row of some batch is. Rows of later requests join at
// layer 1 while earlier rows are deeper.
//
// A session is owned by one scheduler thread (not thread-safe); it holds a reference to its engine.
#include <torch/custom_class.h>

#include <tuple>
#include <unordered_map>
#include <vector>

#include "engine.h"

namespace costeff::engine {

class EngineSession : public torch::CustomClassHolder {
 public:
  // (tags [F] int64, logits [F, num_labels] fp32, exit_layer [F] int64 1-based, entropy [F] fp32,
  // forced [F] bool): the rows a call finished, in no particular order.
  using Finished = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

  explicit EngineSession(c10::intrusive_ptr<InferenceEngine> engine);

  // Checks and embeds new rows (InferenceEngine::run's input rules). tags: int64 [B], unique among the
  // rows in flight; thresholds: float64 [B] (the threshold rule per row).
  void admit(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& token_type_ids,
             const at::Tensor& tags, const at::Tensor& thresholds);
  // Runs one layer for every row in flight; returns the rows that left at an exit.
  Finished step();
  // Finishes the named rows now (a deadline): each answers from the last exit it passed; a row that
  // has passed none runs on to the first exit. forced = true. Unknown tags are ignored.
  Finished finish(const at::Tensor& tags);
  // Drops the named rows (their client has gone) without an answer; returns how many were in flight.
  int64_t drop(const at::Tensor& tags);

  int64_t rows() const { return static_cast<int64_t>(slots_.size()); }
  int64_t tokens() const;
  // Rows in flight by layers done: [0] just embedded ... [num_layers - 1].
  std::vector<int64_t> rows_per_depth() const;

 private:
  struct Slot {
    int64_t tag = 0;
    float threshold = 0.f;
    int64_t depth = 0;  // layers done
    int64_t exit_layer = 0;  // last exit passed (0: none yet)
    float entropy = 0.f;
    std::vector<float> logits;
  };
  struct Collector;
  // Ends a slot; with `forced`, answers it from its last exit into `out`.
  void take_slot(int64_t slot_index, Collector& out, bool forced);

  c10::intrusive_ptr<InferenceEngine> engine_;
  std::vector<RowBatch> groups_;  // groups_[d]: rows that have done d layers
  std::unordered_map<int64_t, Slot> slots_;  // TokenRow::index -> its slot
  std::unordered_map<int64_t, int64_t> by_tag_;
  int64_t next_slot_ = 0;
  Workspace ws_;
};

void register_session(torch::Library& m);

}  // namespace costeff::engine
