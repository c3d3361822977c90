// Portability macros shared by the host (g++) and device (nvcc) builds. Torch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__)
#define FD_DEVICE_CODE 1
#else
#define FD_DEVICE_CODE 0
#endif

namespace fastdistill {

// Element dtype codes. fastdistill/backends/_ext.py holds the same numbers.
enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Error codes returned by every launcher (0 = success). The Python side turns them into messages.
enum Status : int32_t {
  kOk = 0,
  kBadArgument = 1,
  kUnsupportedDType = 2,
  kCudaError = 3,
};

}  // namespace fastdistill
