// Slim FFN on CPU: with enough rows, the rows are cut into blocks and each thread runs, per block,
// GEMM (+bias) -> exact GELU in place -> GEMM (+bias) into the output rows. The intermediate block stays in the
// thread's L2 and there is a single fork/join instead of one per stage (under load a fork/join waits
// for a descheduled thread). Any intermediate size; 0 (a fully pruned FFN) returns out_bias broadcast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "costeff/op_checks.h"

namespace costeff {
namespace {

// Intermediate block kept per thread: up to ~1 MiB of fp32 (one Zen 4 L2); blocks of whole 16 rows
// keep MKL at full speed (measured: per-row GEMM time is flat from 32 to 256 rows).
constexpr int64_t kMidBlockFloats = int64_t(1) << 18;
// Below this many multiply-adds, or fewer rows than this per thread, the FFN is one block.
constexpr int64_t kSerialWork = int64_t(1) << 21;
constexpr int64_t kMinRowsPerThread = 64;

}  // namespace

at::Tensor slim_ffn_cpu(
    const at::Tensor& hidden,
    const at::Tensor& in_weight,
    const at::Tensor& in_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias) {
  const int64_t inter = check_slim_ffn_inputs(hidden, in_weight, in_bias, out_weight, out_bias);
  TORCH_CHECK_VALUE(hidden.device().is_cpu(), "costeff::slim_ffn (CPU kernel): hidden must be a CPU tensor");
  const auto dtype = hidden.scalar_type();
  const int64_t H = hidden.size(-1);
  if (dtype == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    return at::linear(at::gelu(at::linear(hidden, in_weight, in_bias)), out_weight, out_bias);
  }
  const int64_t rows = H == 0 ? 0 : hidden.numel() / H;
  const auto b2 = out_bias.to(at::kFloat);
  at::Tensor out;
  if (inter == 0 || rows == 0) {
    out = b2.expand({rows, H}).contiguous();
  } else {
    const auto x = hidden.reshape({rows, H}).to(at::kFloat).contiguous();
    const auto w1t = in_weight.to(at::kFloat).t();
    const auto b1 = in_bias.to(at::kFloat);
    const auto w2t = out_weight.to(at::kFloat).t();
    out = at::empty({rows, H}, x.options());
    const int64_t threads = at::get_num_threads();
    const int64_t work = rows * inter * H * 2;
    if (threads == 1 || work <= kSerialWork || rows < kMinRowsPerThread * threads) {
      // Too few rows to give each thread a block MKL runs at full speed: one block on the calling
      // thread, the GEMMs threaded by MKL as in the eager composition, GELU in place.
      auto mid = at::addmm(b1, x, w1t);
      at::gelu_(mid);
      at::addmm_out(out, b2, mid, w2t);
    } else {
      const int64_t cap = std::max<int64_t>(16, kMidBlockFloats / inter / 16 * 16);
      const int64_t per_thread = (rows + threads - 1) / threads;
      const int64_t block = std::max<int64_t>(1, std::min({cap, (per_thread + 15) / 16 * 16, rows}));
      const int64_t n_blocks = (rows + block - 1) / block;
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        // Worker threads start with empty dispatch TLS: skip the autograd/inplace-view layers, as the
        // op itself already runs below them.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        at::Tensor mid = at::empty({block, inter}, x.options());
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t r0 = blk * block, n = std::min(block, rows - r0);
          auto mid_rows = mid.narrow(0, 0, n);
          at::addmm_out(mid_rows, b1, x.narrow(0, r0, n), w1t);
          at::gelu_(mid_rows);
          auto out_rows = out.narrow(0, r0, n);
          at::addmm_out(out_rows, b2, mid_rows, w2t);
        }
      });
    }
  }
  out = out.view(hidden.sizes());
  return dtype == at::kFloat ? out : out.to(dtype);
}

TORCH_LIBRARY_IMPL(costeff, CPU, m) {
  m.impl("slim_ffn", &slim_ffn_cpu);
}

}  // namespace costeff
