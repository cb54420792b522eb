#pragma once
// Per-row math in csrc/include/costeff/*.h is shared by the CPU kernels and the CUDA kernels, so the
// CPU tests also exercise the code the GPU runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define COSTEFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define COSTEFF_HOST_DEVICE inline
#endif
