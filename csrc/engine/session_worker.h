#pragma once
// A thread of its own that turns an EngineSession (docs/serve.md): rows are queued from any thread,
// admitted while the session holds fewer than max_batch_tokens real tokens (at least one row when it
// holds none), answered at their deadline from the exit they reached, dropped when cancelled, and
// stepped one layer per turn. Finished rows pile up until take() hands them over, all at once.
//
// Why not a Python thread calling step(): between two steps such a thread needs the GIL, and while
// the event loop holds it (parsing, tokenizing) the engine waits up to the interpreter's switch
// interval (5 ms) per step. Here the engine never waits for Python; only take() does.
#include <torch/custom_class.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "session.h"

namespace costeff::engine {

class SessionWorker : public torch::CustomClassHolder {
 public:
  // (tags [F] int64, logits [F, C] fp32, exit_layer [F] int64, entropy [F] fp32, forced [F] bool,
  //  queue_s [F] fp64 (queued to admitted), inference_s [F] fp64 (admitted to answered),
  //  failed_tags [K] int64, error: why those K rows failed ("" when K == 0))
  using Delivered = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::string>;

  // start = false: no thread; the caller turns the crank with turn() (deterministic tests).
  SessionWorker(c10::intrusive_ptr<InferenceEngine> engine, int64_t max_batch_tokens, bool start);
  ~SessionWorker() override;

  // Queues rows: ids holds them back to back (lengths[i] tokens each); types likewise or empty (none);
  // one tag (unique among rows held), threshold (the threshold rule) and deadline (seconds from now;
  // < 0: none) per row. All or nothing: a bad argument raises and queues no row.
  void submit(const std::vector<int64_t>& ids, const std::vector<int64_t>& lengths, const std::vector<int64_t>& types,
              const std::vector<int64_t>& tags, const std::vector<double>& thresholds, const std::vector<double>& deadlines_s);
  // Forgets the named rows, queued or in flight (their client has gone); unknown tags are ignored.
  void cancel(const std::vector<int64_t>& tags);
  // Waits up to timeout_s for finished rows and hands over every one there is (maybe none).
  Delivered take(double timeout_s);
  // One turn on the calling thread (only without a thread of its own): admit, deadlines, cancels, step.
  // Returns whether anything was held.
  bool turn();
  // Takes no more rows; the thread finishes every row held, then ends (without waiting for it here). Idempotent.
  void stop();
  // True once stopped (or broken) with nothing held and the thread gone: nothing more will be delivered.
  bool finished() const;
  std::vector<int64_t> rows_per_depth() const;
  int64_t queued_rows() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    int64_t tag = 0;
    std::vector<int64_t> ids, types;
    double threshold = 0.0;
    std::optional<Clock::time_point> deadline;
    Clock::time_point enqueued;
  };
  struct Held {  // a row in the session
    Clock::time_point enqueued, started;
    std::optional<Clock::time_point> deadline;
  };

  void loop();
  bool turn_locked_out();  // the turn itself; the caller holds no lock
  void deliver(const EngineSession::Finished& f);
  void fail(const std::vector<int64_t>& tags, const std::string& why);
  bool idle_locked() const { return pending_.empty() && cancels_.empty() && in_flight_ == 0; }

  c10::intrusive_ptr<InferenceEngine> engine_;
  EngineSession session_;  // touched by the turning thread only
  std::unordered_map<int64_t, Held> held_;  // likewise
  int64_t max_batch_tokens_;
  bool has_thread_;

  mutable std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Pending> pending_;
  std::unordered_set<int64_t> tags_;  // queued or in flight
  std::unordered_set<int64_t> cancels_;
  int64_t in_flight_ = 0;  // rows in the session (a copy the other threads may read)
  std::vector<int64_t> depth_snapshot_;
  bool stopping_ = false, finished_ = false;
  // delivered, not yet taken
  std::vector<int64_t> d_tags_, d_layers_, d_failed_;
  std::vector<float> d_logits_, d_entropy_;
  std::vector<uint8_t> d_forced_;
  std::vector<double> d_queue_, d_inference_;
  std::string d_error_;
  std::thread thread_;
};

void register_session_worker(torch::Library& m);

}  // namespace costeff::engine
