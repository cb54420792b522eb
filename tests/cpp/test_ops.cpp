// C++ test of the costeff op library as a libtorch user sees it: ops looked up through the
// dispatcher by name (nothing from costeff_ops is linked by symbol), compared with ATen compositions
// computed in float64, and bad arguments raising c10::Error that names the argument.
// Runs every case on CPU, and on CUDA too when the library was built with CUDA and a GPU is present.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKey.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#ifndef COSTEFF_TEST_EXPECT_CUDA
#define COSTEFF_TEST_EXPECT_CUDA 0
#endif

namespace {

int g_checks = 0;
int g_failures = 0;

void fail(const std::string& what, const std::string& detail) {
  ++g_failures;
  std::cerr << "FAIL " << what << ": " << detail << "\n";
}

void expect(bool cond, const std::string& what, const std::string& detail = "") {
  ++g_checks;
  if (!cond) fail(what, detail);
}

// |actual - expected| <= atol + rtol * |expected| elementwise, in float64.
void expect_close(const at::Tensor& actual, const at::Tensor& expected, double atol, double rtol, const std::string& what) {
  ++g_checks;
  const auto a = actual.to(at::kCPU).to(at::kDouble);
  const auto e = expected.to(at::kCPU).to(at::kDouble);
  if (a.sizes() != e.sizes()) {
    std::ostringstream s;
    s << "shape " << a.sizes() << " != expected " << e.sizes();
    return fail(what, s.str());
  }
  const auto err = (a - e).abs();
  const auto excess = err - (atol + rtol * e.abs());
  if (a.numel() > 0 && (excess.max().item<double>() > 0 || !at::isfinite(a).all().item<bool>())) {
    std::ostringstream s;
    s << "max abs error " << err.max().item<double>() << " (atol " << atol << ", rtol " << rtol << ")";
    fail(what, s.str());
  }
}

// The call must throw a c10::Error whose message contains `needle` (the argument's name).
void expect_error(const std::function<void()>& call, const std::string& needle, const std::string& what) {
  ++g_checks;
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) fail(what, "error does not mention '" + needle + "': " + msg);
    return;
  }
  fail(what, "no c10::Error thrown");
}

c10::OperatorHandle find_op(const char* name) {
  const auto schema = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!schema) {
    throw std::runtime_error(
        std::string(name) + " is not registered: link costeff_ops with -Wl,--no-as-needed (its ops come from static "
        "registrations, and a linker dropping 'unused' libraries drops them all)");
  }
  const auto op = *schema;
  if (!op.hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    throw std::runtime_error(std::string(name) + " has no CPU kernel: were costeff_ops' registrations linked?");
  }
  return op;
}

using Opt = std::optional<at::Tensor>;
using ExitHeadFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Opt&, const Opt&, const at::Tensor&, const at::Tensor&, double, c10::string_view);
using AddLayerNormFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using SlimFfnFn =
    at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using SlimAttentionFn = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    int64_t);

struct Tol {
  double atol;
  double rtol;
};
Tol tol_for(at::ScalarType t) {
  if (t == at::kBFloat16) return {2e-2, 2e-2};
  if (t == at::kHalf) return {2e-3, 2e-3};
  return {2e-5, 2e-5};
}

std::string tag(const char* op, at::Device dev, at::ScalarType t, const std::string& what) {
  std::ostringstream s;
  s << op << " [" << dev << ", " << t << "] " << what;
  return s.str();
}

// ---------------------------------------------------------------- exit_head
void test_exit_head(at::Device dev) {
  auto op = find_op("costeff::exit_head").typed<ExitHeadFn>();
  struct Case {
    int64_t batch, hidden, classes;
    bool pooler;
  };
  // 37: not a multiple of any SIMD width or the warp size; 64x256x200 takes the CPU kernel's GEMM path.
  const std::vector<Case> cases = {{7, 37, 3, false}, {5, 37, 2, true}, {4, 16, 1, false}, {64, 256, 200, false}};
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const auto& c : cases) {
      for (const char* act : {"tanh", "relu", "gelu"}) {
        const auto opts = at::TensorOptions().dtype(dtype).device(dev);
        const std::string a(act);
        auto hidden = at::randn({c.batch, c.hidden}, opts);
        // a saturated, near one-hot row: entropy close to 0 (tanh only: ReLU/GELU would pass the x30
        // through and the fp32 sums' rounding would grow with it)
        if (a == "tanh") hidden[0].mul_(30);
        const auto cw = (at::randn({c.classes, c.hidden}, opts) * 0.5).to(dtype);
        const auto cb = at::randn({c.classes}, opts);
        Opt pw, pb;
        if (c.pooler) {
          pw = (at::randn({c.hidden, c.hidden}, opts) / std::sqrt(double(c.hidden))).to(dtype);
          pb = at::randn({c.hidden}, opts);
        }
        // Reference in float64 from the same (rounded) inputs.
        auto pre = hidden.to(at::kDouble);
        if (c.pooler) pre = at::addmm(pb->to(at::kDouble), pre, pw->to(at::kDouble).t());
        const auto activated = a == "relu" ? at::relu(pre) : a == "gelu" ? at::gelu(pre) : at::tanh(pre);
        const auto ref_logits = at::addmm(cb.to(at::kDouble), activated, cw.to(at::kDouble).t());
        const auto log_p = at::log_softmax(ref_logits, 1);
        const auto ref_entropy = -(log_p.exp() * log_p).sum(1);
        const double tau = ref_entropy.median().item<double>() + 1e-3;

        const auto [logits, entropy, exit_mask] = op.call(hidden, pw, pb, cw, cb, tau, act);
        std::ostringstream shape;
        shape << c.batch << "x" << c.hidden << "x" << c.classes << (c.pooler ? " pooler " : " ") << act;
        const auto t = tol_for(dtype);
        expect(logits.scalar_type() == dtype, tag("exit_head", dev, dtype, "logits dtype " + shape.str()));
        expect(entropy.scalar_type() == at::kFloat, tag("exit_head", dev, dtype, "entropy is fp32 " + shape.str()));
        expect(exit_mask.scalar_type() == at::kBool, tag("exit_head", dev, dtype, "exit_mask is bool " + shape.str()));
        expect_close(logits, ref_logits.to(dtype), t.atol, t.rtol, tag("exit_head", dev, dtype, "logits " + shape.str()));
        // The kernel's entropy comes from its fp32 logits; bf16 only rounds the returned logits.
        expect_close(entropy, ref_entropy, 1e-4, 1e-4, tag("exit_head", dev, dtype, "entropy " + shape.str()));
        const auto decided = (ref_entropy - tau).abs().gt(1e-3).to(at::kCPU);
        const auto ref_exit = ref_entropy.lt(tau).to(at::kCPU);
        expect(
            exit_mask.to(at::kCPU).masked_select(decided).equal(ref_exit.masked_select(decided)),
            tag("exit_head", dev, dtype, "exit_mask " + shape.str()));
        if (c.classes == 1) {
          expect(entropy.abs().max().item<float>() == 0.f, tag("exit_head", dev, dtype, "one class has zero entropy"));
        }
      }
    }
  }

  // Bad arguments.
  const auto opts = at::TensorOptions().device(dev);
  const auto h = at::randn({3, 8}, opts), cw = at::randn({2, 8}, opts), cb = at::randn({2}, opts);
  expect_error([&] { op.call(h, std::nullopt, std::nullopt, cw, at::randn({3}, opts), 0.5, "tanh"); }, "classifier_bias",
               "exit_head rejects a classifier_bias of the wrong size");
  expect_error([&] { op.call(h, std::nullopt, std::nullopt, at::randn({2, 9}, opts), cb, 0.5, "tanh"); }, "classifier_weight",
               "exit_head rejects a classifier_weight of the wrong width");
  expect_error([&] { op.call(h, at::randn({8, 8}, opts), std::nullopt, cw, cb, 0.5, "tanh"); }, "pooler_bias",
               "exit_head rejects a pooler_weight without pooler_bias");
  expect_error([&] { op.call(h.unsqueeze(0), std::nullopt, std::nullopt, cw, cb, 0.5, "tanh"); }, "hidden",
               "exit_head rejects a 3-D hidden");
  expect_error([&] { op.call(h, std::nullopt, std::nullopt, cw.to(at::kDouble), cb, 0.5, "tanh"); }, "classifier_weight",
               "exit_head rejects mixed dtypes");
  expect_error([&] { op.call(h, std::nullopt, std::nullopt, cw, cb, std::nan(""), "tanh"); }, "threshold",
               "exit_head rejects a NaN threshold");
  expect_error([&] { op.call(h, std::nullopt, std::nullopt, cw, cb, 0.5, "sigmoid"); }, "activation",
               "exit_head rejects an unknown activation");
  auto h_nan = h.clone();
  h_nan[2][5] = std::nan("");
  expect_error([&] { op.call(h_nan, std::nullopt, std::nullopt, cw, cb, 0.5, "tanh"); }, "row 2",
               "exit_head reports the row with non-finite logits");
}

// ---------------------------------------------------------------- add_layer_norm
void test_add_layer_norm(at::Device dev) {
  auto op = find_op("costeff::add_layer_norm").typed<AddLayerNormFn>();
  const std::vector<std::vector<int64_t>> shapes = {{2, 3, 37}, {5, 768}, {4, 1}, {3, 2000}};
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto opts = at::TensorOptions().dtype(dtype).device(dev);
    for (const auto& shape : shapes) {
      const int64_t n = shape.back();
      // An offset of 100 checks that the variance is not computed as E[x^2] - E[x]^2.
      const auto x = (at::randn(shape, opts) + 100).to(dtype);
      const auto r = at::randn(shape, opts);
      const auto w = at::randn({n}, opts), b = at::randn({n}, opts);
      const double eps = 1e-5;
      const auto ref = at::layer_norm(x.to(at::kDouble) + r.to(at::kDouble), {n}, w.to(at::kDouble), b.to(at::kDouble), eps);
      const auto out = op.call(x, r, w, b, eps);
      std::ostringstream s;
      s << shape;
      const auto t = tol_for(dtype);
      expect(out.scalar_type() == dtype, tag("add_layer_norm", dev, dtype, "dtype " + s.str()));
      // 1e-4 abs for fp32: x + r near 100 carries ~4e-6 rounding before normalisation.
      expect_close(out, ref.to(dtype), dtype == at::kFloat ? 1e-4 : t.atol, t.rtol,
                   tag("add_layer_norm", dev, dtype, "values " + s.str()));
    }
    // Non-contiguous input (a transposed view).
    const auto x = at::randn({37, 6}, opts).t(), r = at::randn({6, 37}, opts);
    const auto w = at::randn({37}, opts), b = at::randn({37}, opts);
    const auto ref = at::layer_norm(x.to(at::kDouble) + r.to(at::kDouble), {37}, w.to(at::kDouble), b.to(at::kDouble), 1e-12);
    const auto t = tol_for(dtype);
    expect_close(op.call(x, r, w, b, 1e-12), ref.to(dtype), t.atol * 5, t.rtol,
                 tag("add_layer_norm", dev, dtype, "non-contiguous x"));
  }
  const auto opts = at::TensorOptions().device(dev);
  const auto x = at::randn({2, 8}, opts), w = at::randn({8}, opts), b = at::randn({8}, opts);
  expect_error([&] { op.call(x, at::randn({2, 7}, opts), w, b, 1e-5); }, "residual",
               "add_layer_norm rejects a residual of another shape");
  expect_error([&] { op.call(x, x, at::randn({7}, opts), b, 1e-5); }, "weight",
               "add_layer_norm rejects a weight of the wrong size");
  expect_error([&] { op.call(x, x, w, b, 0.0); }, "eps", "add_layer_norm rejects eps = 0");
  expect_error([&] { op.call(x, x.to(at::kBFloat16), w, b, 1e-5); }, "residual", "add_layer_norm rejects mixed dtypes");
}

// ---------------------------------------------------------------- slim_ffn
void test_slim_ffn(at::Device dev) {
  auto op = find_op("costeff::slim_ffn").typed<SlimFfnFn>();
  const auto opts = at::TensorOptions().device(dev);
  for (const int64_t inter : {int64_t(0), int64_t(13), int64_t(64)}) {
    const auto x = at::randn({2, 5, 24}, opts);
    const auto w1 = at::randn({inter, 24}, opts) * 0.2, b1 = at::randn({inter}, opts);
    const auto w2 = at::randn({24, inter}, opts) * 0.2, b2 = at::randn({24}, opts);
    const auto mid = at::gelu(at::linear(x.to(at::kDouble), w1.to(at::kDouble), b1.to(at::kDouble)));
    const auto ref = at::linear(mid, w2.to(at::kDouble), b2.to(at::kDouble));
    expect_close(op.call(x, w1, b1, w2, b2), ref, 1e-4, 1e-4,
                 tag("slim_ffn", dev, at::kFloat, "intermediate " + std::to_string(inter)));
  }
  const auto x = at::randn({3, 8}, opts);
  expect_error([&] { op.call(x, at::randn({4, 8}, opts), at::randn({5}, opts), at::randn({8, 4}, opts), at::randn({8}, opts)); },
               "in_bias", "slim_ffn rejects an in_bias of the wrong size");
}

// ---------------------------------------------------------------- slim_attention
void test_slim_attention(at::Device dev) {
  auto op = find_op("costeff::slim_attention").typed<SlimAttentionFn>();
  const auto opts = at::TensorOptions().device(dev);
  const int64_t batch = 3, seq = 6, hidden = 16;
  // Row 1 has padding, row 2 is all padding (its attention output is the bias alone).
  auto mask = at::ones({batch, seq}, opts.dtype(at::kBool));
  mask[1].slice(0, 4).fill_(false);
  mask[2].fill_(false);
  for (const int64_t heads : {int64_t(0), int64_t(1), int64_t(3)}) {
    const int64_t d = 5;  // odd head size, as pruning leaves it
    const int64_t inner = heads * d;
    const auto x = at::randn({batch, seq, hidden}, opts);
    const auto wqkv = at::randn({3 * inner, hidden}, opts) * 0.3, bqkv = at::randn({3 * inner}, opts);
    const auto wo = at::randn({hidden, inner}, opts) * 0.3, bo = at::randn({hidden}, opts);
    at::Tensor ref;
    if (heads == 0) {
      ref = bo.to(at::kDouble).expand({batch, seq, hidden});
    } else {
      const auto qkv = at::linear(x.to(at::kDouble), wqkv.to(at::kDouble), bqkv.to(at::kDouble))
                           .view({batch, seq, 3, heads, d})
                           .permute({2, 0, 3, 1, 4});
      const auto scores = at::matmul(qkv[0], qkv[1].transpose(-1, -2)) / std::sqrt(double(d));
      const auto keep = mask.view({batch, 1, 1, seq});
      const auto probs = at::softmax(scores.masked_fill(keep.logical_not(), -1e300), -1) * keep;
      const auto ctx = at::matmul(probs, qkv[2]).transpose(1, 2).reshape({batch, seq, inner});
      ref = at::linear(ctx, wo.to(at::kDouble), bo.to(at::kDouble));
    }
    expect_close(op.call(x, mask, wqkv, bqkv, wo, bo, heads), ref, 1e-4, 1e-4,
                 tag("slim_attention", dev, at::kFloat, std::to_string(heads) + " heads"));
  }
  const auto x = at::randn({batch, seq, hidden}, opts);
  expect_error([&] { op.call(x, mask, at::randn({14, hidden}, opts), at::randn({14}, opts), at::randn({hidden, 4}, opts), at::randn({hidden}, opts), 2); },
               "qkv_weight", "slim_attention rejects qkv rows that are not a multiple of 3 * num_heads");
}

}  // namespace

int main() {
  at::manual_seed(0);
#if COSTEFF_TEST_EXPECT_CUDA
  for (const char* name : {"costeff::exit_head", "costeff::add_layer_norm"}) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    expect(op && op->hasKernelForDispatchKey(c10::DispatchKey::CUDA), std::string(name) + " has a CUDA kernel");
  }
#endif
  std::vector<at::Device> devices = {at::Device(at::kCPU)};
  if (at::hasCUDA()) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("costeff::exit_head", "");
    if (op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) devices.emplace_back(at::kCUDA);
  }
  try {
    for (const auto& dev : devices) {
      std::cout << "device " << dev << "\n";
      test_exit_head(dev);
      test_add_layer_norm(dev);
      if (dev.is_cpu()) {  // csrc/cuda has no slim_* kernels (Triton serves them on GPU)
        test_slim_ffn(dev);
        test_slim_attention(dev);
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "FAIL unexpected exception: " << e.what() << "\n";
    return 1;
  }
  std::cout << g_checks - g_failures << "/" << g_checks << " checks passed\n";
  return g_failures == 0 ? 0 : 1;
}
