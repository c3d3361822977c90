// Host (OpenMP) kernels. Each is compiled once per ISA level (namespaces base / avx2 / avx512,
// see setup.py) and csrc/cpu/dispatch.cpp picks the best one the running CPU supports.
#pragma once

#include <cstdint>

#include "fastdistill/divergence.h"
#include "fastdistill/feature.h"

namespace fastdistill {
namespace cpu {

// Logit-level distillation over n_rows rows, in one call:
//   loss_rows[r] = soft_scale * D(P_r, Q_r) + hard_weight * CE_r   (0 for ignored rows)
//   grad[r, :]   = grad_scale * d loss_rows[r] / d student[r, :]     (if grad != nullptr)
// student / teacher: rows of `stride` elements in their dtype, V = params.vocab real columns.
// grad has the student's dtype and `grad_width` columns (>= V; columns >= V are zeroed) and may
// alias `student` (each chunk is read before it is overwritten). labels may be nullptr.
// Returns a Status.
#define FD_DECLARE_CPU_KERNELS(ns)                                                              \
  namespace ns {                                                                                \
  int32_t distill_rows(const void* student, int32_t s_dtype, int64_t s_stride,                  \
                       const void* teacher, int32_t t_dtype, int64_t t_stride,                  \
                       const int64_t* labels, void* grad, int64_t g_stride, int64_t grad_width, \
                       float* loss_rows, int64_t n_rows, const DistillParams& params,           \
                       float grad_scale, int32_t num_threads);                                  \
  int32_t feature_rows(const void* student, int32_t s_dtype, int64_t s_stride,                  \
                       const void* teacher, int32_t t_dtype, int64_t t_stride,                  \
                       const bool* mask, void* grad, int64_t g_stride, float* loss_rows,        \
                       int64_t n_rows, int64_t dim, int32_t kind, float grad_scale,             \
                       int32_t num_threads);                                                    \
  }

FD_DECLARE_CPU_KERNELS(base)
FD_DECLARE_CPU_KERNELS(avx2)
FD_DECLARE_CPU_KERNELS(avx512)
FD_DECLARE_CPU_KERNELS(best)  // dispatch.cpp: the fastest variant this CPU runs

// Name of the variant `best` resolves to ("avx512", "avx2" or "base").
const char* isa_name();

}  // namespace cpu
}  // namespace fastdistill
