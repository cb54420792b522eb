// Continuous batching at layer granularity (see session.h).
#include "session.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "costeff/exit_head.h"
#include "costeff/op_checks.h"

namespace costeff::engine {
namespace {

// Removes the rows `drop` selects from `batch`, keeping the others' states contiguous; returns them
// as a batch of their own.
template <typename Pred>
RowBatch split_rows(RowBatch& batch, int64_t H, Pred drop) {
  RowBatch out, keep;
  for (TokenRow& r : batch.rows) {
    RowBatch& dst = drop(r) ? out : keep;
    dst.h.resize((dst.tokens + r.len) * H);
    std::memcpy(&dst.h[dst.tokens * H], &batch.h[r.start * H], r.len * H * sizeof(float));
    r.start = dst.tokens;
    dst.tokens += r.len;
    dst.rows.push_back(std::move(r));
  }
  batch = std::move(keep);
  return out;
}

std::vector<int64_t> int64_list(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 1 && !t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool,
                    "costeff engine session: ", name, " must be a 1-D integer tensor");
  const auto c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

struct EngineSession::Collector {
  std::vector<int64_t> tags, layers;
  std::vector<float> logits, entropy;
  std::vector<uint8_t> forced;

  void add(int64_t tag, const float* lg, int64_t C, int64_t layer, float ent, bool f) {
    tags.push_back(tag);
    logits.insert(logits.end(), lg, lg + C);
    layers.push_back(layer);
    entropy.push_back(ent);
    forced.push_back(f);
  }

  Finished tensors(int64_t C) const {
    const int64_t F = static_cast<int64_t>(tags.size());
    auto t = at::empty({F}, at::kLong), lg = at::empty({F, C}, at::kFloat), lay = at::empty({F}, at::kLong), ent = at::empty({F}, at::kFloat),
         f = at::empty({F}, at::kBool);
    std::copy(tags.begin(), tags.end(), t.data_ptr<int64_t>());
    std::copy(logits.begin(), logits.end(), lg.data_ptr<float>());
    std::copy(layers.begin(), layers.end(), lay.data_ptr<int64_t>());
    std::copy(entropy.begin(), entropy.end(), ent.data_ptr<float>());
    for (int64_t i = 0; i < F; ++i) f.data_ptr<bool>()[i] = forced[i] != 0;
    return {t, lg, lay, ent, f};
  }
};

EngineSession::EngineSession(c10::intrusive_ptr<InferenceEngine> engine) : engine_(std::move(engine)) {
  TORCH_CHECK_VALUE(engine_, "costeff engine session: engine is null");
  groups_.resize(engine_->num_layers());
}

void EngineSession::admit(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                          const std::optional<at::Tensor>& token_type_ids, const at::Tensor& tags, const at::Tensor& thresholds) {
  const std::vector<int64_t> tag_list = int64_list(tags, "tags");
  TORCH_CHECK_VALUE(input_ids.defined() && input_ids.dim() == 2 && input_ids.size(0) == static_cast<int64_t>(tag_list.size()),
                    "costeff engine session: tags must hold one tag per input row (", input_ids.defined() && input_ids.dim() == 2 ? input_ids.size(0) : -1,
                    "), got ", tag_list.size());
  TORCH_CHECK_VALUE(thresholds.defined() && thresholds.dim() == 1 && thresholds.numel() == static_cast<int64_t>(tag_list.size()),
                    "costeff engine session: thresholds must hold one threshold per input row");
  const auto th = thresholds.to(at::kCPU, at::kDouble).contiguous();
  std::unordered_set<int64_t> fresh;
  for (size_t i = 0; i < tag_list.size(); ++i) {
    check_threshold("costeff engine session", th.data_ptr<double>()[i]);
    TORCH_CHECK_VALUE(!by_tag_.count(tag_list[i]) && fresh.insert(tag_list[i]).second, "costeff engine session: tag ", tag_list[i],
                      " is already in flight; tags must be unique");
  }
  RowBatch batch = engine_->embed(input_ids, attention_mask, token_type_ids, ws_);  // checks the inputs before anything is kept
  for (TokenRow& r : batch.rows) {
    const int64_t b = r.index;
    const int64_t slot = next_slot_++;
    slots_[slot] = Slot{tag_list[b], static_cast<float>(th.data_ptr<double>()[b]), 0, 0, 0.f, {}};
    by_tag_[tag_list[b]] = slot;
    r.index = slot;
  }
  groups_[0].append(std::move(batch), engine_->config().hidden_size);
}

void EngineSession::take_slot(int64_t slot_index, Collector& out, bool forced) {
  auto it = slots_.find(slot_index);
  const Slot& s = it->second;
  if (forced) out.add(s.tag, s.logits.data(), engine_->num_labels(), s.exit_layer, s.entropy, true);
  by_tag_.erase(s.tag);
  slots_.erase(it);
}

EngineSession::Finished EngineSession::step() {
  const int64_t L = engine_->num_layers(), C = engine_->num_labels(), H = engine_->config().hidden_size;
  Collector out;
  for (int64_t d = L - 1; d >= 0; --d) {  // deepest first: rows moved to d + 1 wait for the next step
    if (groups_[d].rows.empty()) continue;
    RowBatch batch = std::move(groups_[d]);
    groups_[d] = RowBatch{};
    engine_->layer(d, batch, ws_);
    const bool last = d + 1 == L;
    if (engine_->has_exit(d)) {
      engine_->exit(d, batch, [&](const TokenRow& r, const float* logits, float entropy) {
        Slot& s = slots_.at(r.index);
        if (last || exit_decision(entropy, s.threshold)) {
          out.add(s.tag, logits, C, d + 1, entropy, false);
          take_slot(r.index, out, false);
          return true;
        }
        s.logits.assign(logits, logits + C);  // what a deadline answers with
        s.exit_layer = d + 1;
        s.entropy = entropy;
        return false;
      }, ws_);
    }
    for (const TokenRow& r : batch.rows) slots_.at(r.index).depth = d + 1;
    if (!last) groups_[d + 1].append(std::move(batch), H);
  }
  return out.tensors(C);
}

EngineSession::Finished EngineSession::finish(const at::Tensor& tags) {
  const int64_t L = engine_->num_layers(), C = engine_->num_labels(), H = engine_->config().hidden_size;
  std::unordered_set<int64_t> wanted;
  for (int64_t t : int64_list(tags, "tags"))
    if (by_tag_.count(t)) wanted.insert(by_tag_.at(t));
  Collector out;
  RowBatch pending;  // named rows that have passed no exit yet
  for (int64_t d = 0; d < L; ++d) {
    RowBatch named = split_rows(groups_[d], H, [&](const TokenRow& r) { return wanted.count(r.index) > 0; });
    for (const TokenRow& r : named.rows)
      if (slots_.at(r.index).exit_layer > 0) take_slot(r.index, out, true);
    pending.append(split_rows(named, H, [&](const TokenRow& r) { return slots_.count(r.index) > 0; }), H);
  }
  if (pending.rows.empty()) return out.tensors(C);
  // run them on to the first exit, merging depth groups as they catch up
  const int64_t first = engine_->config().exit_start;  // 1-based layer of the first exit
  for (int64_t d = 0; d < first; ++d) {
    RowBatch at_d = split_rows(pending, H, [&](const TokenRow& r) { return slots_.at(r.index).depth == d; });
    if (at_d.rows.empty()) continue;
    engine_->layer(d, at_d, ws_);
    for (const TokenRow& r : at_d.rows) slots_.at(r.index).depth = d + 1;
    pending.append(std::move(at_d), H);
  }
  engine_->exit(first - 1, pending, [&](const TokenRow& r, const float* logits, float entropy) {
    Slot& s = slots_.at(r.index);
    s.logits.assign(logits, logits + C);
    s.exit_layer = first;
    s.entropy = entropy;
    take_slot(r.index, out, true);
    return true;
  }, ws_);
  return out.tensors(C);
}

int64_t EngineSession::drop(const at::Tensor& tags) {
  const int64_t H = engine_->config().hidden_size;
  std::unordered_set<int64_t> wanted;
  for (int64_t t : int64_list(tags, "tags"))
    if (by_tag_.count(t)) wanted.insert(by_tag_.at(t));
  if (wanted.empty()) return 0;
  Collector unused;
  int64_t n = 0;
  for (RowBatch& g : groups_) {
    RowBatch gone = split_rows(g, H, [&](const TokenRow& r) { return wanted.count(r.index) > 0; });
    for (const TokenRow& r : gone.rows) take_slot(r.index, unused, false);
    n += static_cast<int64_t>(gone.rows.size());
  }
  return n;
}

int64_t EngineSession::tokens() const {
  int64_t n = 0;
  for (const RowBatch& g : groups_) n += g.tokens;
  return n;
}

std::vector<int64_t> EngineSession::rows_per_depth() const {
  std::vector<int64_t> n;
  for (const RowBatch& g : groups_) n.push_back(static_cast<int64_t>(g.rows.size()));
  return n;
}

void register_session(torch::Library& m) {
  m.class_<EngineSession>("EngineSession")
      .def(torch::init<c10::intrusive_ptr<InferenceEngine>>())
      .def("admit", [](const c10::intrusive_ptr<EngineSession>& self, at::Tensor input_ids, std::optional<at::Tensor> attention_mask,
                       std::optional<at::Tensor> token_type_ids, at::Tensor tags, at::Tensor thresholds) {
        self->admit(input_ids, attention_mask, token_type_ids, tags, thresholds);
      })
      .def("step", [](const c10::intrusive_ptr<EngineSession>& self) { return self->step(); })
      .def("finish", [](const c10::intrusive_ptr<EngineSession>& self, at::Tensor tags) { return self->finish(tags); })
      .def("drop", [](const c10::intrusive_ptr<EngineSession>& self, at::Tensor tags) { return self->drop(tags); })
      .def("rows", [](const c10::intrusive_ptr<EngineSession>& self) { return self->rows(); })
      .def("tokens", [](const c10::intrusive_ptr<EngineSession>& self) { return self->tokens(); })
      .def("rows_per_depth", [](const c10::intrusive_ptr<EngineSession>& self) { return self->rows_per_depth(); });
}

}  // namespace costeff::engine
