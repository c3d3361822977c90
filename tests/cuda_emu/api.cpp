// C entry points of the emulated CUDA launchers, for ctypes (tests/test_cuda_emulated.py). They
// take the argument structs of csrc/include/fastdistill/args.h, filled from Python through
// ctypes mirrors of the same layout (tests/cuda_emu/build.py).
#include <cstdint>

#include "cuda/launchers.h"

namespace fd = fastdistill;

extern "C" {

int32_t emu_distill(const fd::DistillArgs* a) { return fd::cuda::distill_rows(*a); }
int32_t emu_feature(const fd::FeatureArgs* a) { return fd::cuda::feature_rows(*a); }
int32_t emu_scale(const fd::ScaleArgs* a) { return fd::cuda::scale_rows(*a); }
int32_t emu_topk(const fd::TopkArgs* a) { return fd::cuda::topk_rows(*a); }
const char* emu_last_error() { return fd::cuda::last_error(); }

// sizeof of each struct, so that the ctypes mirrors can be checked against the C++ layout
int64_t emu_sizeof(int32_t which) {
  return which == 0 ? sizeof(fd::DistillArgs) : which == 1 ? sizeof(fd::FeatureArgs)
                                                           : sizeof(fd::ScaleArgs);
}
}
