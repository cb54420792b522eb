// LayerNorm(x + residual) on CUDA: one block per row. Each thread gathers Welford statistics over its
// strided slice of x + residual (fp32), warps merge by shuffles and the warps through shared memory,
// all with welford_merge from costeff/add_layer_norm.h (the CPU kernel merges its SIMD lanes with it);
// a second pass re-reads the row (L1/L2-resident) and normalizes.
//
// Two parts: the kernel + launcher use CUDA headers only (-DCOSTEFF_CUDA_KERNELS_ONLY compiles them
// against a CPU torch); the torch binding needs a CUDA torch.
#include "common.cuh"
#include "costeff/add_layer_norm.h"

namespace costeff {
namespace cuda {

constexpr int kAddLayerNormMaxThreads = 512;

__device__ __forceinline__ WelfordState welford_warp_merge(WelfordState s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const WelfordState other{
        __shfl_xor_sync(kFullMask, s.mean, offset), __shfl_xor_sync(kFullMask, s.m2, offset),
        __shfl_xor_sync(kFullMask, s.count, offset)};
    s = welford_merge(s, other);
  }
  return s;
}

template <typename T>
__global__ void add_layer_norm_kernel(
    const T* __restrict__ x,
    const T* __restrict__ residual,
    const T* __restrict__ gamma,
    const T* __restrict__ beta,
    T* __restrict__ out,
    int64_t n,
    float eps) {
  __shared__ WelfordState warp_stats[kAddLayerNormMaxThreads / kWarpSize];
  __shared__ WelfordState row_stats;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * n;
  const T* xr = x + offset;
  const T* rr = residual + offset;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  WelfordState s = welford_empty();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s = welford_add(s, to_float(xr[i]) + to_float(rr[i]));
  s = welford_warp_merge(s);
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = welford_warp_merge(lane < num_warps ? warp_stats[lane] : welford_empty());
    if (lane == 0) row_stats = s;
  }
  __syncthreads();
  const WelfordState stats = row_stats;
  const float rstd = layer_norm_rstd(stats, eps);
  T* o = out + offset;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = to_float(xr[i]) + to_float(rr[i]);
    o[i] = from_float<T>(layer_norm_affine(v, stats.mean, rstd, to_float(gamma[i]), to_float(beta[i])));
  }
}

// Rows of n contiguous elements; about four elements per thread, whole warps, at most 512 threads.
template <typename T>
void launch_add_layer_norm(
    const T* x, const T* residual, const T* gamma, const T* beta, T* out, int64_t rows, int64_t n, float eps,
    cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  int64_t threads = ((n + 3) / 4 + kWarpSize - 1) / kWarpSize * kWarpSize;
  threads = threads < kWarpSize ? kWarpSize : (threads > kAddLayerNormMaxThreads ? kAddLayerNormMaxThreads : threads);
  add_layer_norm_kernel<T><<<static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0, stream>>>(
      x, residual, gamma, beta, out, n, eps);
}

template void launch_add_layer_norm<float>(
    const float*, const float*, const float*, const float*, float*, int64_t, int64_t, float, cudaStream_t);
template void launch_add_layer_norm<__half>(
    const __half*, const __half*, const __half*, const __half*, __half*, int64_t, int64_t, float, cudaStream_t);
template void launch_add_layer_norm<__nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, int64_t,
    int64_t, float, cudaStream_t);

}  // namespace cuda
}  // namespace costeff

#ifndef COSTEFF_CUDA_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "costeff/op_checks.h"
#include "type_map.cuh"

namespace costeff {
namespace {

template <typename scalar_t>
void run_add_layer_norm(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b, at::Tensor& out, float eps) {
  using T = typename cuda::CudaType<scalar_t>::type;
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  cuda::launch_add_layer_norm<T>(
      reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), reinterpret_cast<const T*>(r.data_ptr<scalar_t>()),
      reinterpret_cast<const T*>(w.data_ptr<scalar_t>()), reinterpret_cast<const T*>(b.data_ptr<scalar_t>()),
      reinterpret_cast<T*>(out.data_ptr<scalar_t>()), rows, n, eps, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor add_layer_norm_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_add_layer_norm_inputs(x, residual, weight, bias, eps);
  TORCH_CHECK_VALUE(x.is_cuda(), "costeff::add_layer_norm (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.size(-1);
  if (x.scalar_type() == at::kDouble) {
    // float64 (gradcheck, references) keeps full precision through an ATen composition.
    return at::layer_norm(x + residual, {n}, weight, bias, eps);
  }
  const int64_t rows = x.numel() / n;
  TORCH_CHECK_VALUE(
      rows <= std::numeric_limits<int32_t>::max(), "costeff::add_layer_norm: x has ", rows,
      " rows, more than the CUDA grid limit");
  const auto xc = x.contiguous();
  const auto rc = residual.contiguous();
  const auto wc = weight.contiguous();
  const auto bc = bias.contiguous();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const float feps = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat:
      run_add_layer_norm<float>(xc, rc, wc, bc, out, feps);
      break;
    case at::kHalf:
      run_add_layer_norm<at::Half>(xc, rc, wc, bc, out, feps);
      break;
    case at::kBFloat16:
      run_add_layer_norm<at::BFloat16>(xc, rc, wc, bc, out, feps);
      break;
    default:
      TORCH_CHECK_TYPE(false, "costeff::add_layer_norm (CUDA kernel): unsupported dtype ", x.scalar_type());
  }
  return out;
}

TORCH_LIBRARY_IMPL(costeff, CUDA, m) {
  m.impl("add_layer_norm", &add_layer_norm_cuda);
}

}  // namespace costeff
#endif  // COSTEFF_CUDA_KERNELS_ONLY
