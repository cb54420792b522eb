// The engine's inference: input checks, unpadded token rows, embeddings, per layer attention, FFN and
// exit with row compaction (see engine.h).
#include "engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "../cpu/attention_core.h"
#include "../cpu/shared_rows.h"
#include "costeff/exit_head.h"
#include "costeff/op_checks.h"

namespace costeff::engine {
namespace {

// Multiply-adds below which a linear layer runs on the calling thread: a fork/join costs a few us.
constexpr int64_t kParallelMacs = int64_t(1) << 18;
// Elements below which per-row work (activation preparation, LayerNorm) stays on the calling thread.
constexpr int64_t kParallelElements = int64_t(1) << 15;
// y = act(x W^T + b) for M rows, parallel over output panels (and row chunks when panels are few).
void run_linear(const PackedLinear& lin, const LinearKernels& kern, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, Activation act, Workspace& s) {
  if (M == 0 || lin.out_features() == 0) return;
  PreparedInput in;
  in.f32 = x;
  in.stride = ldx;
  const int64_t K = lin.in_features();
  if (lin.precision() != Precision::kFloat32) {
    uint16_t* bf16 = nullptr;
    int8_t* q = nullptr;
    in.stride = lin.prepared_stride();
    if (lin.precision() == Precision::kBFloat16) {
      s.bf16.resize(std::max<size_t>(s.bf16.size(), M * in.stride));
      in.bf16 = bf16 = s.bf16.data();
    } else {
      s.q.resize(std::max<size_t>(s.q.size(), M * in.stride));
      s.scale.resize(std::max<size_t>(s.scale.size(), M));
      in.q = q = s.q.data();
      in.scale = s.scale.data();
    }
    float* scale = s.scale.data();
    const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, K));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) { lin.prepare_rows(kern, x, ldx, m0, m1, bf16, q, scale); });
  }
  const int64_t P = lin.panels();
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || M * lin.macs_per_row() < kParallelMacs || at::in_parallel_region()) {
    lin.run(kern, in, 0, M, 0, P, y, ldy, act);
    return;
  }
  const int64_t row_chunks = P >= 2 * threads ? 1 : std::min<int64_t>((2 * threads + P - 1) / P, (M + 5) / 6);
  const int64_t chunk = (M + row_chunks - 1) / row_chunks;
  at::parallel_for(0, P * row_chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / row_chunks, rc = t % row_chunks;
      const int64_t m0 = rc * chunk, m1 = std::min(M, m0 + chunk);
      lin.run(kern, in, m0, m1, p, p + 1, y, ldy, act);
    }
  });
}

// out[r] = LayerNorm(x[r] + res[r]) for M rows of n.
void layer_norm_rows(const LinearKernels& kern, const float* x, const float* res, const std::vector<float>& g, const std::vector<float>& b,
                     float* out, int64_t M, int64_t n, float eps) {
  const bool avx2 = kern.avx2_rows;
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, n));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) add_layer_norm_row_cpu(x + r * n, res + r * n, g.data(), b.data(), out + r * n, n, eps, avx2);
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

}  // namespace

void RowBatch::append(RowBatch&& other, int64_t hidden) {
  if (other.rows.empty()) return;
  if (rows.empty()) {
    *this = std::move(other);
    return;
  }
  h.resize((tokens + other.tokens) * hidden);
  std::memcpy(&h[tokens * hidden], other.h.data(), other.tokens * hidden * sizeof(float));
  for (TokenRow& r : other.rows) {
    r.start += tokens;
    rows.push_back(std::move(r));
  }
  tokens += other.tokens;
  other = RowBatch{};
}

RowBatch InferenceEngine::embed(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                                const std::optional<at::Tensor>& token_type_ids, Workspace& ws, std::map<std::string, double>* profile) const {
  StageClock clock(profile);
  const EngineConfig& c = config_;
  const int64_t H = c.hidden_size;
  // ---- input checks (the same rules as prepare_inputs in modeling_costeff.py)
  TORCH_CHECK_VALUE(input_ids.defined(), "costeff engine: input_ids is undefined");
  TORCH_CHECK_VALUE(input_ids.device().is_cpu(), "costeff engine: input_ids must be a CPU tensor, got ", input_ids.device());
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "costeff engine: input_ids must be 2-D [batch, seq_len], got shape ", input_ids.sizes());
  TORCH_CHECK_TYPE(!input_ids.is_floating_point() && !input_ids.is_complex() && input_ids.scalar_type() != at::kBool,
                   "costeff engine: input_ids must be an integer tensor, got ", input_ids.scalar_type());
  const int64_t B = input_ids.size(0), S = input_ids.size(1);
  RowBatch batch;
  if (B == 0) return batch;
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
  batch.rows.reserve(B);
  std::vector<int64_t> tok_pos, pos_id;  // flat input index and position-table row of every kept token
  tok_pos.reserve(B * S);
  pos_id.reserve(B * S);
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    TokenRow r{b, T, 0, {}};
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
    TORCH_CHECK_VALUE(!r.keys.empty(), "costeff engine: attention_mask rows [", b, "] have no real token (all padding); remove them from the batch");
    T += r.len;
    batch.rows.push_back(std::move(r));
  }
  batch.tokens = T;
  batch.h.resize(T * H);
  // ---- embeddings: LayerNorm((word [projected] + position) + token type), as CostEffEmbeddings
  std::vector<float>& h = batch.h;
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
      run_linear(word_projection_, *kern_, words.data(), wd, T, x.data(), E, Activation::kNone, ws);
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
      add_layer_norm_row_cpu(xt, type, embed_norm_weight_.data(), embed_norm_bias_.data(), &out[t * E], E, static_cast<float>(c.layer_norm_eps), kern_->avx2_rows);
    }
    if (c.embedding_size > 0) run_linear(embedding_projection_, *kern_, normed.data(), E, T, h.data(), H, Activation::kNone, ws);
  }
  clock.lap("embeddings");
  return batch;
}

void InferenceEngine::layer(int64_t l, RowBatch& batch, Workspace& ws, std::map<std::string, double>* profile) const {
  StageClock clock(profile);
  const EngineConfig& c = config_;
  const int64_t H = c.hidden_size, T = batch.tokens;
  const float eps = static_cast<float>(c.layer_norm_eps);
  const LayerWeights& L = layers_[l];
  const int64_t inner = L.heads * L.head_size;
  const std::string tag = profile != nullptr ? "layer" + std::to_string(l + 1) + "." : "";
  std::vector<float>& h = batch.h;
  std::vector<float>& h1 = ws.h1;
  std::vector<float>& tmp = ws.tmp;
  h1.resize(std::max(h1.size(), static_cast<size_t>(T * H)));
  tmp.resize(std::max(tmp.size(), static_cast<size_t>(T * H)));
  std::vector<float>& qkv = ws.qkv;
  std::vector<float>& ctx = ws.ctx;
  std::vector<float>& mid = ws.mid;
  std::vector<int64_t>& key_rows = ws.key_rows;
  std::vector<int64_t>& q_start = ws.q_start;
  std::vector<int64_t>& q_len = ws.q_len;
  std::vector<int64_t>& n_keys = ws.n_keys;
  const std::vector<TokenRow>& rows = batch.rows;
  // ---- attention + add&norm
  if (inner > 0) {
    qkv.resize(T * 3 * inner);
    ctx.resize(T * inner);
    run_linear(L.qkv, *kern_, h.data(), H, T, qkv.data(), 3 * inner, Activation::kNone, ws);
    clock.lap(tag, "qkv");
    const int64_t R = static_cast<int64_t>(rows.size());
    int64_t max_len = 0;
    for (const TokenRow& r : rows) max_len = std::max(max_len, r.len);
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
    if (kern_->avx2_rows) {
      attention_core_avx2(ar, qkv.data(), 3 * inner, qkv.data() + inner, qkv.data() + 2 * inner, 3 * inner, ctx.data(), L.heads, L.head_size);
    } else
#endif
    {
      attention_core_portable<float>(ar, qkv.data(), 3 * inner, qkv.data() + inner, qkv.data() + 2 * inner, 3 * inner, ctx.data(), L.heads,
                                     L.head_size);
    }
    clock.lap(tag, "attention");
    run_linear(L.attn_out, *kern_, ctx.data(), inner, T, tmp.data(), H, Activation::kNone, ws);
  } else {
    for (int64_t t = 0; t < T; ++t) std::copy(L.attn_out_bias.begin(), L.attn_out_bias.end(), tmp.begin() + t * H);
  }
  clock.lap(tag, "attn_out");
  layer_norm_rows(*kern_, tmp.data(), h.data(), L.norm1_weight, L.norm1_bias, h1.data(), T, H, eps);
  clock.lap(tag, "norm1");
  // ---- FFN + add&norm
  if (L.ffn > 0) {
    mid.resize(T * L.ffn);
    run_linear(L.ffn_in, *kern_, h1.data(), H, T, mid.data(), L.ffn, Activation::kGelu, ws);
    clock.lap(tag, "ffn_in");
    run_linear(L.ffn_out, *kern_, mid.data(), L.ffn, T, tmp.data(), H, Activation::kNone, ws);
  } else {
    for (int64_t t = 0; t < T; ++t) std::copy(L.ffn_out_bias.begin(), L.ffn_out_bias.end(), tmp.begin() + t * H);
  }
  clock.lap(tag, "ffn_out");
  layer_norm_rows(*kern_, tmp.data(), h1.data(), L.norm2_weight, L.norm2_bias, h.data(), T, H, eps);
  clock.lap(tag, "norm2");
}

void InferenceEngine::exit(int64_t l, RowBatch& batch, const ExitDecision& leave, Workspace& ws, std::map<std::string, double>* profile) const {
  StageClock clock(profile);
  const EngineConfig& c = config_;
  const int64_t H = c.hidden_size, C = c.num_labels;
  const int64_t layer = l + 1;
  TORCH_CHECK(layer >= c.exit_start, "costeff engine: layer ", layer, " has no exit");
  const std::string tag = profile != nullptr ? "layer" + std::to_string(layer) + "." : "";
  std::vector<float>& h = batch.h;
  std::vector<float>& pooled = ws.pooled;
  std::vector<float>& tmp = ws.tmp;
  std::vector<float> logits(C);
  std::vector<TokenRow>& rows = batch.rows;
  const ExitWeights& X = exits_[layer - c.exit_start];
  const bool last = layer == c.num_layers;  // the last exit reads CLS whatever exit_pooling says
  const int64_t R = static_cast<int64_t>(rows.size());
  pooled.resize(R * H);
  for (int64_t b = 0; b < R; ++b) {
    float* dst = &pooled[b * H];
    const TokenRow& r = rows[b];
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
    tmp.resize(std::max(tmp.size(), static_cast<size_t>(R * H)));  // exit() may be the first user of the workspace
    run_linear(X.pooler, *kern_, pooled.data(), H, R, tmp.data(), H, X.activation, ws);
    std::copy(tmp.begin(), tmp.begin() + R * H, pooled.begin());
  } else {
    kern_->activate(pooled.data(), R * H, Activation::kTanh);
  }
  std::vector<TokenRow> stay;
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
    TokenRow& r = rows[b];
    if (leave(r, logits.data(), entropy)) continue;
    if (r.start != new_T) std::memmove(&h[new_T * H], &h[r.start * H], r.len * H * sizeof(float));
    r.start = new_T;
    new_T += r.len;
    stay.push_back(std::move(r));
  }
  rows.swap(stay);
  batch.tokens = new_T;
  clock.lap(tag, "exit");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> InferenceEngine::run(
    const at::Tensor& input_ids,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& token_type_ids,
    double threshold,
    std::map<std::string, double>* profile) const {
  check_threshold("costeff engine", threshold);
  const EngineConfig& c = config_;
  const int64_t C = c.num_labels;
  Workspace ws;
  RowBatch batch = embed(input_ids, attention_mask, token_type_ids, ws, profile);
  const int64_t B = input_ids.size(0);
  auto logits_out = at::zeros({B, C}, at::kFloat);
  auto layer_out = at::zeros({B}, at::kLong);
  auto entropy_out = at::zeros({B}, at::kFloat);
  float* lo = logits_out.data_ptr<float>();
  int64_t* lay = layer_out.data_ptr<int64_t>();
  float* ent = entropy_out.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  for (int64_t l = 0; l < c.num_layers && !batch.rows.empty(); ++l) {
    layer(l, batch, ws, profile);
    if (!has_exit(l)) continue;
    const bool last = l + 1 == c.num_layers;
    exit(l, batch, [&](const TokenRow& r, const float* logits, float entropy) {
      if (!last && !exit_decision(entropy, t)) return false;
      std::copy(logits, logits + C, lo + r.index * C);
      lay[r.index] = l + 1;
      ent[r.index] = entropy;
      return true;
    }, ws, profile);
  }
  return {logits_out, layer_out, entropy_out};
}
}  // namespace costeff::engine
