#pragma once
// at:: scalar types -> the CUDA types the kernels use (same bit layout), for the torch bindings only.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.cuh"

namespace costeff {
namespace cuda {

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16));

}  // namespace cuda
}  // namespace costeff
