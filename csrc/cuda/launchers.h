// Host entry points of the CUDA kernels. Plain C++: includers need neither torch nor the CUDA
// headers. The arguments are the structs of csrc/include/fastdistill/args.h: device pointers,
// strides in elements, and `stream`, a cudaStream_t (nullptr = the legacy default stream). Every
// launcher only enqueues work on that stream (no host synchronisation) and returns a Status; on
// kCudaError, last_error() gives the message.
#pragma once

#include <cstdint>

#include "fastdistill/args.h"

namespace fastdistill {
namespace cuda {

// Logit-level distillation (DistillArgs); grad_scale is a device pointer, read by the kernel.
int32_t distill_rows(const DistillArgs& a);

// Feature losses (FeatureArgs); grad_scale is a device pointer.
int32_t feature_rows(const FeatureArgs& a);

// Top-k (sparse teacher) distillation (TopkArgs); grad_scale, work are device pointers.
int32_t topk_rows(const TopkArgs& a);

// In-place row scaling of a gradient (ScaleArgs); factor is a device pointer.
int32_t scale_rows(const ScaleArgs& a);

// Message of the last kCudaError returned on this thread ("" if none).
const char* last_error();

}  // namespace cuda
}  // namespace fastdistill
