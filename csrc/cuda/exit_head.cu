// Fused exit head on CUDA: [pooler dense] -> activation -> classifier -> logits, softmax entropy and
// the exit decision. The pooler dense (H x H) is a cuBLAS GEMM in the binding; the rest is one block per
// row: the activation (exit_activation, costeff/exit_head.h) of the row into shared memory, one warp per class (warp-reduced dot), the online entropy
// state per warp (costeff/exit_head.h, the same math as the CPU kernel), merged across warps.
//
// Two parts: the kernels + launchers use CUDA headers only, so `-DCOSTEFF_CUDA_KERNELS_ONLY` compiles
// them against a CPU torch (where c10/cuda is missing); the torch binding needs a CUDA torch.
#include "common.cuh"
#include "costeff/exit_head.h"

namespace costeff {
namespace cuda {

constexpr int kExitHeadMaxWarps = 8;
// activation(row) is cached in shared memory up to this many floats; wider rows recompute it per class.
constexpr int64_t kExitHeadMaxCachedHidden = 8192;

template <typename HT, typename WT>
__global__ void exit_head_kernel(
    const HT* __restrict__ hidden,
    const WT* __restrict__ weight,
    const WT* __restrict__ bias,
    WT* __restrict__ logits,
    float* __restrict__ entropy,
    bool* __restrict__ exit_mask,
    unsigned long long* __restrict__ first_bad_row,
    int64_t hidden_row_stride,
    int64_t hidden_size,
    int64_t classes,
    float threshold,
    int activation,
    bool cache_pooled) {
  extern __shared__ float pooled[];
  __shared__ EntropyState warp_state[kExitHeadMaxWarps];
  const int64_t row = blockIdx.x;
  const HT* h = hidden + row * hidden_row_stride;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  if (cache_pooled) {
    for (int64_t i = threadIdx.x; i < hidden_size; i += blockDim.x) pooled[i] = exit_activation(to_float(h[i]), activation);
    __syncthreads();
  }
  // After warp_sum every lane holds the logit, so every lane keeps the same state (no shuffles).
  EntropyState state = entropy_state_empty();
  bool finite = true;
  for (int64_t c = warp; c < classes; c += num_warps) {
    const WT* w = weight + c * hidden_size;
    float acc = 0.f;
    for (int64_t i = lane; i < hidden_size; i += kWarpSize) {
      const float p = cache_pooled ? pooled[i] : exit_activation(to_float(h[i]), activation);
      acc = fmaf(p, to_float(w[i]), acc);
    }
    const float z = warp_sum(acc) + to_float(bias[c]);
    finite = finite && isfinite(z);
    state = entropy_state_add(state, z);
    if (lane == 0) logits[row * classes + c] = from_float<WT>(z);
  }
  if (lane == 0) warp_state[warp] = state;
  const bool row_finite = __syncthreads_and(finite);  // also the barrier for warp_state
  if (threadIdx.x == 0) {
    EntropyState s = warp_state[0];
    for (int w = 1; w < num_warps; ++w) s = entropy_state_merge(s, warp_state[w]);
    const float ent = entropy_state_finalize(s);
    entropy[row] = ent;
    exit_mask[row] = exit_decision(ent, threshold);
    if (!row_finite) atomicMin(first_bad_row, static_cast<unsigned long long>(row));
  }
}

// HT is the type the kernel reads the CLS states in (fp32 after the pooler dense), WT the parameter
// and logits type (the op's dtype). Rows of hidden may be strided (hidden_states[:, 0] needs no copy)
// but each row is contiguous. first_bad_row must hold ULLONG_MAX before the launch.
template <typename HT, typename WT>
void launch_exit_head(
    const HT* hidden,
    const WT* weight,
    const WT* bias,
    WT* logits,
    float* entropy,
    bool* exit_mask,
    unsigned long long* first_bad_row,
    int64_t rows,
    int64_t hidden_row_stride,
    int64_t hidden_size,
    int64_t classes,
    float threshold,
    int activation,
    cudaStream_t stream) {
  if (rows == 0) return;
  const int warps = static_cast<int>(classes < kExitHeadMaxWarps ? (classes < 4 ? 4 : classes) : kExitHeadMaxWarps);
  const bool cache_pooled = hidden_size <= kExitHeadMaxCachedHidden;
  const size_t smem = cache_pooled ? static_cast<size_t>(hidden_size) * sizeof(float) : 0;
  exit_head_kernel<HT, WT><<<static_cast<unsigned>(rows), warps * kWarpSize, smem, stream>>>(
      hidden, weight, bias, logits, entropy, exit_mask, first_bad_row, hidden_row_stride, hidden_size, classes, threshold,
      activation, cache_pooled);
}

// Explicit instantiations: every dtype pair's device code is compiled even in the kernels-only build.
#define COSTEFF_INSTANTIATE_EXIT_HEAD(HT, WT)                                                                     \
  template void launch_exit_head<HT, WT>(                                                                       \
      const HT*, const WT*, const WT*, WT*, float*, bool*, unsigned long long*, int64_t, int64_t, int64_t, int64_t, \
      float, int, cudaStream_t);
COSTEFF_INSTANTIATE_EXIT_HEAD(float, float)
COSTEFF_INSTANTIATE_EXIT_HEAD(__half, __half)
COSTEFF_INSTANTIATE_EXIT_HEAD(__nv_bfloat16, __nv_bfloat16)
COSTEFF_INSTANTIATE_EXIT_HEAD(float, __half)
COSTEFF_INSTANTIATE_EXIT_HEAD(float, __nv_bfloat16)
#undef COSTEFF_INSTANTIATE_EXIT_HEAD

}  // namespace cuda
}  // namespace costeff

#ifndef COSTEFF_CUDA_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include <torch/version.h>

#include "costeff/op_checks.h"
#include "type_map.cuh"

namespace costeff {
namespace {

template <typename scalar_t>
void run_exit_head(
    const at::Tensor& h,
    const at::Tensor& weight,
    const at::Tensor& bias,
    at::Tensor& logits,
    at::Tensor& entropy,
    at::Tensor& exit_mask,
    at::Tensor& first_bad_row,
    float threshold,
    int activation) {
  using WT = typename cuda::CudaType<scalar_t>::type;
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* bad = reinterpret_cast<unsigned long long*>(first_bad_row.data_ptr<int64_t>());
  const auto* w = reinterpret_cast<const WT*>(weight.data_ptr<scalar_t>());
  const auto* b = reinterpret_cast<const WT*>(bias.data_ptr<scalar_t>());
  auto* z = reinterpret_cast<WT*>(logits.data_ptr<scalar_t>());
  const int64_t rows = h.size(0), stride = h.stride(0), hidden = h.size(1), classes = weight.size(0);
  if (h.scalar_type() == at::kFloat) {
    cuda::launch_exit_head<float, WT>(
        h.data_ptr<float>(), w, b, z, entropy.data_ptr<float>(), exit_mask.data_ptr<bool>(), bad, rows, stride,
        hidden, classes, threshold, activation, stream);
  } else {
    cuda::launch_exit_head<WT, WT>(
        reinterpret_cast<const WT*>(h.data_ptr<scalar_t>()), w, b, z, entropy.data_ptr<float>(),
        exit_mask.data_ptr<bool>(), bad, rows, stride, hidden, classes, threshold, activation, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cuda(
    const at::Tensor& hidden,
    const std::optional<at::Tensor>& pooler_weight,
    const std::optional<at::Tensor>& pooler_bias,
    const at::Tensor& classifier_weight,
    const at::Tensor& classifier_bias,
    double threshold,
    c10::string_view activation) {
  const ExitHeadSizes sz = check_exit_head_inputs(
      hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation);
  TORCH_CHECK_VALUE(hidden.is_cuda(), "costeff::exit_head (CUDA kernel): hidden must be a CUDA tensor");
  TORCH_CHECK_VALUE(
      sz.batch <= std::numeric_limits<int32_t>::max(), "costeff::exit_head: hidden.size(0) (", sz.batch,
      ") exceeds the CUDA grid limit");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  const int64_t B = sz.batch, C = sz.classes;
  if (hidden.scalar_type() == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    auto pre = sz.has_pooler ? at::addmm(*pooler_bias, hidden, pooler_weight->t()) : hidden;
    auto act = sz.activation == kExitRelu ? at::relu(pre) : sz.activation == kExitGelu ? at::gelu(pre) : at::tanh(pre);
    auto logits64 = at::addmm(classifier_bias, act, classifier_weight.t());
    auto log_p = at::log_softmax(logits64, 1);
    auto ent64 = (-(log_p.exp() * log_p).sum(1)).clamp_min(0);
    auto finite = at::isfinite(logits64).all(1);
    TORCH_CHECK_VALUE(
        finite.all().item<bool>(), "costeff::exit_head: non-finite logits (NaN/Inf) in row ",
        at::logical_not(finite).nonzero()[0][0].item<int64_t>(),
        ": check hidden and the pooler/classifier weights for NaN/Inf");
    return {logits64, ent64, at::lt(ent64, threshold)};
  }
  auto logits = at::empty({B, C}, hidden.options());
  auto entropy = at::empty({B}, hidden.options().dtype(at::kFloat));
  auto exit_mask = at::empty({B}, hidden.options().dtype(at::kBool));
  if (B == 0) return {logits, entropy, exit_mask};
  // The pooler dense accumulates and writes fp32 (as the CPU kernel and the reference do), so the kernel
  // then reads fp32; 16-bit weights go to the GEMM as they are (mm.dtype), not converted on every call.
  at::Tensor h;
  if (!sz.has_pooler) {
    h = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  } else if (hidden.scalar_type() == at::kFloat) {
    h = at::addmm(*pooler_bias, hidden, pooler_weight->t());
  } else {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    h = at::mm(hidden, pooler_weight->t(), at::kFloat).add_(*pooler_bias);
#else
    h = at::addmm(pooler_bias->to(at::kFloat), hidden.to(at::kFloat), pooler_weight->to(at::kFloat).t());
#endif
  }
  const auto w = classifier_weight.contiguous();
  const auto b = classifier_bias.contiguous();
  // -1 reads as ULLONG_MAX in the kernel's atomicMin: "no bad row".
  auto first_bad_row = at::full({1}, -1, hidden.options().dtype(at::kLong));
  const float tau = static_cast<float>(threshold);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      run_exit_head<float>(h, w, b, logits, entropy, exit_mask, first_bad_row, tau, sz.activation);
      break;
    case at::kHalf:
      run_exit_head<at::Half>(h, w, b, logits, entropy, exit_mask, first_bad_row, tau, sz.activation);
      break;
    case at::kBFloat16:
      run_exit_head<at::BFloat16>(h, w, b, logits, entropy, exit_mask, first_bad_row, tau, sz.activation);
      break;
    default:
      TORCH_CHECK_TYPE(false, "costeff::exit_head (CUDA kernel): unsupported dtype ", hidden.scalar_type());
  }
  // One sync: the caller reads exit_mask on the host next anyway (to compact the batch).
  const int64_t bad = first_bad_row.item<int64_t>();
  TORCH_CHECK_VALUE(
      bad < 0, "costeff::exit_head: non-finite logits (NaN/Inf) in row ", bad,
      ": check hidden and the pooler/classifier weights for NaN/Inf");
  return {logits, entropy, exit_mask};
}

TORCH_LIBRARY_IMPL(costeff, CUDA, m) {
  m.impl("exit_head", &exit_head_cuda);
}

}  // namespace costeff
#endif  // COSTEFF_CUDA_KERNELS_ONLY
