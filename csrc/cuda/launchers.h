// Host entry points of the CUDA kernels. Plain C++: includers need neither torch nor the CUDA
// headers. Pointers are device pointers, strides are in elements, dtype codes are those of
// fastdistill/config.h, `stream` is a cudaStream_t (0 = the legacy default stream). Every
// launcher only enqueues work on `stream` (no host synchronisation) and returns a Status; on
// kCudaError, last_error() gives the message.
#pragma once

#include <cstdint>

#include "fastdistill/divergence.h"

namespace fastdistill {
namespace cuda {

// Logit-level distillation over n_rows rows, same contract as cpu::distill_rows
// (csrc/cpu/kernels.h), except that grad_scale is a device pointer to one float, read by the
// kernel. grad may be nullptr (loss only) or alias student.
int32_t distill_rows(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                     int32_t t_dtype, int64_t t_stride, const int64_t* labels, void* grad,
                     int64_t g_stride, int64_t grad_width, float* loss_rows, int64_t n_rows,
                     const DistillParams& params, const float* grad_scale, void* stream);

// Feature losses, same contract as cpu::feature_rows; grad_scale is a device pointer.
int32_t feature_rows(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                     int32_t t_dtype, int64_t t_stride, const bool* mask, void* grad,
                     int64_t g_stride, float* loss_rows, int64_t n_rows, int64_t dim,
                     int32_t kind, const float* grad_scale, void* stream);

// grad[r, :width] *= factor[r] (per_row) or factor[0], in place; rows whose factor is exactly 1
// are not touched.
int32_t scale_rows(void* grad, int32_t dtype, int64_t stride, int64_t n_rows, int64_t width,
                   const float* factor, bool per_row, void* stream);

// Message of the last kCudaError returned on this thread ("" if none).
const char* last_error();

}  // namespace cuda
}  // namespace fastdistill
