// C entry points of the emulated CUDA launchers, for ctypes (tests/test_cuda_emulated.py). They
// take the argument structs of csrc/include/fastdistill/args.h, filled from Python through
// ctypes mirrors of the same layout (tests/cuda_emu/build.py).
#include <cstdint>

#include "cuda/launchers.h"
#include "emu.h"
#include "fastdistill/fast_math.h"

namespace fd = fastdistill;

namespace fastdistill {
namespace cuda {
// csrc/cuda/distill_cuda.cu
int32_t distill_plan(const DistillArgs& a, int32_t* cluster, int32_t* slice_units,
                     int32_t* store_h);
}  // namespace cuda
}  // namespace fastdistill

extern "C" {

int32_t emu_distill(const fd::DistillArgs* a) { return fd::cuda::distill_rows(*a); }
int32_t emu_feature(const fd::FeatureArgs* a) { return fd::cuda::feature_rows(*a); }
int32_t emu_scale(const fd::ScaleArgs* a) { return fd::cuda::scale_rows(*a); }
int32_t emu_topk(const fd::TopkArgs* a) { return fd::cuda::topk_rows(*a); }
const char* emu_last_error() { return fd::cuda::last_error(); }

// The emulated device the launchers query: compute capability major (8: no clusters) and the
// opt-in dynamic shared memory per block in bytes.
void emu_set_device(int32_t major, int32_t smem_optin) {
  emu::device_major = major;
  emu::device_smem_optin = smem_optin;
  ++emu::device_number;
}

// The logit-level kernel the launcher picks for a call: the cluster size of the resident kernel
// (0: the stream kernel), its slice in units and whether pass 2 keeps h.
int32_t emu_distill_plan(const fd::DistillArgs* a, int32_t* out) {
  return fd::cuda::distill_plan(*a, out, out + 1, out + 2);
}

// The host versions of fd_exp2 / fd_log2 (fastdistill/fast_math.h) over an array, for
// tests/test_fast_math.py.
void emu_exp2(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fd::fd_exp2(x[i]);
}
void emu_log2(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = fd::fd_log2(x[i]);
}

// sizeof of each struct, so that the ctypes mirrors can be checked against the C++ layout
int64_t emu_sizeof(int32_t which) {
  return which == 0 ? sizeof(fd::DistillArgs) : which == 1 ? sizeof(fd::FeatureArgs)
                                                           : sizeof(fd::ScaleArgs);
}
}
