// A thread that turns an EngineSession without Python (see session_worker.h).
#include "session_worker.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "costeff/op_checks.h"

namespace costeff::engine {
namespace {

at::Tensor long_tensor(const std::vector<int64_t>& v) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

std::string first_line(const char* what) {
  std::string s(what);
  return s.substr(0, s.find('\n'));
}

}  // namespace

SessionWorker::SessionWorker(c10::intrusive_ptr<InferenceEngine> engine, int64_t max_batch_tokens, bool start)
    : engine_(engine), session_(engine), max_batch_tokens_(max_batch_tokens), has_thread_(start) {
  TORCH_CHECK_VALUE(max_batch_tokens >= 1, "costeff session worker: max_batch_tokens must be >= 1, got ", max_batch_tokens);
  depth_snapshot_.assign(engine_->num_layers(), 0);
  if (start) thread_ = std::thread([this] { loop(); });
}

SessionWorker::~SessionWorker() {
  stop();
  if (thread_.joinable()) thread_.join();  // it finishes the rows it holds first
}

void SessionWorker::submit(const std::vector<int64_t>& ids, const std::vector<int64_t>& lengths, const std::vector<int64_t>& types,
                           const std::vector<int64_t>& tags, const std::vector<double>& thresholds, const std::vector<double>& deadlines_s) {
  const size_t n = tags.size();
  TORCH_CHECK_VALUE(lengths.size() == n && thresholds.size() == n && deadlines_s.size() == n,
                    "costeff session worker: lengths, thresholds and deadlines_s must hold one entry per tag (", n, ")");
  int64_t total = 0;
  for (int64_t len : lengths) {
    TORCH_CHECK_VALUE(len >= 1, "costeff session worker: every row needs at least one token, got a length of ", len);
    total += len;
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(ids.size()) == total, "costeff session worker: ids holds ", ids.size(), " tokens, lengths sum to ", total);
  TORCH_CHECK_VALUE(types.empty() || types.size() == ids.size(), "costeff session worker: types must be empty or as long as ids");
  for (double t : thresholds) check_threshold("costeff session worker", t);
  const auto now = Clock::now();
  std::vector<Pending> rows(n);
  int64_t at = 0;
  for (size_t i = 0; i < n; ++i) {
    Pending& p = rows[i];
    p.tag = tags[i];
    p.ids.assign(ids.begin() + at, ids.begin() + at + lengths[i]);
    if (!types.empty()) p.types.assign(types.begin() + at, types.begin() + at + lengths[i]);
    at += lengths[i];
    p.threshold = thresholds[i];
    if (deadlines_s[i] >= 0) p.deadline = now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(deadlines_s[i]));
    p.enqueued = now;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    TORCH_CHECK_VALUE(!stopping_, "costeff session worker: stopped, it takes no new rows");
    std::unordered_set<int64_t> fresh;
    for (const Pending& p : rows)
      TORCH_CHECK_VALUE(!tags_.count(p.tag) && fresh.insert(p.tag).second, "costeff session worker: tag ", p.tag, " is already held; tags must be unique");
    for (Pending& p : rows) {
      tags_.insert(p.tag);
      pending_.push_back(std::move(p));
    }
  }
  work_cv_.notify_one();
}

void SessionWorker::cancel(const std::vector<int64_t>& tags) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int64_t t : tags)
      if (tags_.count(t)) cancels_.insert(t);
  }
  work_cv_.notify_one();
}

bool SessionWorker::turn() {
  TORCH_CHECK(!has_thread_, "costeff session worker: turn() is for a worker without a thread of its own");
  return turn_locked_out();
}

bool SessionWorker::turn_locked_out() {
  std::vector<Pending> admit;
  std::vector<int64_t> drop;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_locked()) return false;
    if (!cancels_.empty()) {
      std::deque<Pending> keep;
      for (Pending& p : pending_) {
        if (cancels_.count(p.tag)) {
          tags_.erase(p.tag);
        } else {
          keep.push_back(std::move(p));
        }
      }
      pending_.swap(keep);
      for (int64_t t : cancels_)
        if (tags_.count(t)) drop.push_back(t);
      cancels_.clear();
    }
    int64_t budget = max_batch_tokens_ - session_.tokens();
    while (!pending_.empty()) {
      const int64_t len = static_cast<int64_t>(pending_.front().ids.size());
      if (len > budget && !(admit.empty() && in_flight_ == 0)) break;  // an idle session takes one row whatever its size
      budget -= len;
      admit.push_back(std::move(pending_.front()));
      pending_.pop_front();
    }
  }
  if (!drop.empty()) {
    session_.drop(long_tensor(drop));
    std::lock_guard<std::mutex> lock(mu_);
    for (int64_t t : drop) {
      tags_.erase(t);
      held_.erase(t);
    }
  }
  if (!admit.empty()) {
    int64_t width = 0;
    bool typed = !admit.front().types.empty();
    for (const Pending& p : admit) width = std::max<int64_t>(width, p.ids.size());
    const int64_t n = static_cast<int64_t>(admit.size());
    auto ids = at::zeros({n, width}, at::kLong), mask = at::zeros({n, width}, at::kLong);
    auto types = typed ? at::zeros({n, width}, at::kLong) : at::Tensor();
    auto thresholds = at::empty({n}, at::kDouble);
    std::vector<int64_t> tags(n);
    for (int64_t i = 0; i < n; ++i) {
      const Pending& p = admit[i];
      std::copy(p.ids.begin(), p.ids.end(), ids.data_ptr<int64_t>() + i * width);
      std::fill_n(mask.data_ptr<int64_t>() + i * width, p.ids.size(), 1);
      if (typed && !p.types.empty()) std::copy(p.types.begin(), p.types.end(), types.data_ptr<int64_t>() + i * width);
      thresholds.data_ptr<double>()[i] = p.threshold;
      tags[i] = p.tag;
    }
    try {
      session_.admit(ids, mask, typed ? std::optional<at::Tensor>(types) : std::nullopt, long_tensor(tags), thresholds);
      const auto now = Clock::now();
      for (const Pending& p : admit) held_[p.tag] = Held{p.enqueued, now, p.deadline};
    } catch (const c10::Error& e) {  // the server checked the inputs; whatever slips through fails its rows, never hangs them
      fail(tags, first_line(e.what()));
    }
  }
  std::vector<int64_t> due;
  const auto now = Clock::now();
  for (const auto& [tag, h] : held_)
    if (h.deadline && now >= *h.deadline) due.push_back(tag);
  if (!due.empty()) deliver(session_.finish(long_tensor(due)));
  if (session_.rows() > 0) deliver(session_.step());
  std::lock_guard<std::mutex> lock(mu_);
  in_flight_ = session_.rows();
  depth_snapshot_ = session_.rows_per_depth();
  return true;
}

void SessionWorker::deliver(const EngineSession::Finished& f) {
  const auto& [tags, logits, layers, entropy, forced] = f;
  const int64_t F = tags.size(0), C = logits.size(1);
  if (F == 0) return;
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t i = 0; i < F; ++i) {
    const int64_t tag = tags.data_ptr<int64_t>()[i];
    auto it = held_.find(tag);
    const Held h = it->second;
    held_.erase(it);
    tags_.erase(tag);
    d_tags_.push_back(tag);
    d_logits_.insert(d_logits_.end(), logits.data_ptr<float>() + i * C, logits.data_ptr<float>() + (i + 1) * C);
    d_layers_.push_back(layers.data_ptr<int64_t>()[i]);
    d_entropy_.push_back(entropy.data_ptr<float>()[i]);
    d_forced_.push_back(forced.data_ptr<bool>()[i]);
    d_queue_.push_back(std::chrono::duration<double>(h.started - h.enqueued).count());
    d_inference_.push_back(std::chrono::duration<double>(now - h.started).count());
  }
  done_cv_.notify_all();
}

void SessionWorker::fail(const std::vector<int64_t>& tags, const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t t : tags) {
    tags_.erase(t);
    d_failed_.push_back(t);
  }
  if (!tags.empty()) d_error_ = why;
  done_cv_.notify_all();
}

void SessionWorker::loop() {
  at::init_num_threads();  // the intra-op thread count set by the process (torch.set_num_threads), not OpenMP's default
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stopping_ || !idle_locked(); });
      if (stopping_ && idle_locked()) break;
    }
    try {
      turn_locked_out();
    } catch (const std::exception& e) {  // a broken engine fails every row held, never hangs them
      std::vector<int64_t> all;
      {
        std::lock_guard<std::mutex> lock(mu_);
        all.assign(tags_.begin(), tags_.end());
        pending_.clear();
        cancels_.clear();
        stopping_ = true;
        in_flight_ = 0;
      }
      held_.clear();
      fail(all, std::string("the engine failed: ") + first_line(e.what()));
      break;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  finished_ = true;
  done_cv_.notify_all();
}

SessionWorker::Delivered SessionWorker::take(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  if (timeout_s > 0)
    done_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return !d_tags_.empty() || !d_failed_.empty() || finished_; });
  const int64_t F = static_cast<int64_t>(d_tags_.size()), C = engine_->num_labels();
  auto lg = at::empty({F, C}, at::kFloat), ent = at::empty({F}, at::kFloat), fo = at::empty({F}, at::kBool);
  auto q = at::empty({F}, at::kDouble), inf = at::empty({F}, at::kDouble);
  std::copy(d_logits_.begin(), d_logits_.end(), lg.data_ptr<float>());
  std::copy(d_entropy_.begin(), d_entropy_.end(), ent.data_ptr<float>());
  for (int64_t i = 0; i < F; ++i) fo.data_ptr<bool>()[i] = d_forced_[i] != 0;
  std::copy(d_queue_.begin(), d_queue_.end(), q.data_ptr<double>());
  std::copy(d_inference_.begin(), d_inference_.end(), inf.data_ptr<double>());
  Delivered out{long_tensor(d_tags_), lg, long_tensor(d_layers_), ent, fo, q, inf, long_tensor(d_failed_), d_error_};
  d_tags_.clear();
  d_layers_.clear();
  d_failed_.clear();
  d_logits_.clear();
  d_entropy_.clear();
  d_forced_.clear();
  d_queue_.clear();
  d_inference_.clear();
  d_error_.clear();
  return out;
}

void SessionWorker::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
}

bool SessionWorker::finished() const {
  std::lock_guard<std::mutex> lock(mu_);
  const bool done = has_thread_ ? finished_ : stopping_ && idle_locked();
  return done && d_tags_.empty() && d_failed_.empty();
}

std::vector<int64_t> SessionWorker::rows_per_depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return depth_snapshot_;
}

int64_t SessionWorker::queued_rows() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(pending_.size());
}

void register_session_worker(torch::Library& m) {
  m.class_<SessionWorker>("SessionWorker")
      .def(torch::init<c10::intrusive_ptr<InferenceEngine>, int64_t, bool>())
      .def("submit", [](const c10::intrusive_ptr<SessionWorker>& self, std::vector<int64_t> ids, std::vector<int64_t> lengths,
                        std::vector<int64_t> types, std::vector<int64_t> tags, std::vector<double> thresholds, std::vector<double> deadlines_s) {
        self->submit(ids, lengths, types, tags, thresholds, deadlines_s);
      })
      .def("cancel", [](const c10::intrusive_ptr<SessionWorker>& self, std::vector<int64_t> tags) { self->cancel(tags); })
      .def("take", [](const c10::intrusive_ptr<SessionWorker>& self, double timeout_s) { return self->take(timeout_s); })
      .def("turn", [](const c10::intrusive_ptr<SessionWorker>& self) { return self->turn(); })
      .def("stop", [](const c10::intrusive_ptr<SessionWorker>& self) { self->stop(); })
      .def("finished", [](const c10::intrusive_ptr<SessionWorker>& self) { return self->finished(); })
      .def("rows_per_depth", [](const c10::intrusive_ptr<SessionWorker>& self) { return self->rows_per_depth(); })
      .def("queued_rows", [](const c10::intrusive_ptr<SessionWorker>& self) { return self->queued_rows(); });
}

}  // namespace costeff::engine
