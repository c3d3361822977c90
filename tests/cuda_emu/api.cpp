// C entry points of the emulated CUDA launchers, for ctypes (tests/test_cuda_emulated.py).
#include <cstdint>

#include "cuda/launchers.h"

namespace fd = fastdistill;

extern "C" {

int32_t emu_distill(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                    int32_t t_dtype, int64_t t_stride, const int64_t* labels, void* grad,
                    int64_t g_stride, int64_t grad_width, float* loss_rows, int64_t n_rows,
                    int32_t divergence, float beta, float inv_temperature, float soft_scale,
                    float hard_weight, int64_t ignore_index, int64_t vocab,
                    const float* grad_scale) {
  const fd::DistillParams p{divergence, beta, inv_temperature, soft_scale,
                            hard_weight, ignore_index, vocab};
  return fd::cuda::distill_rows(student, s_dtype, s_stride, teacher, t_dtype, t_stride, labels,
                                grad, g_stride, grad_width, loss_rows, n_rows, p, grad_scale,
                                nullptr);
}

int32_t emu_feature(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                    int32_t t_dtype, int64_t t_stride, const bool* mask, void* grad,
                    int64_t g_stride, float* loss_rows, int64_t n_rows, int64_t dim, int32_t kind,
                    const float* grad_scale) {
  return fd::cuda::feature_rows(student, s_dtype, s_stride, teacher, t_dtype, t_stride, mask, grad,
                                g_stride, loss_rows, n_rows, dim, kind, grad_scale, nullptr);
}

int32_t emu_scale(void* grad, int32_t dtype, int64_t stride, int64_t n_rows, int64_t width,
                  const float* factor, bool per_row) {
  return fd::cuda::scale_rows(grad, dtype, stride, n_rows, width, factor, per_row, nullptr);
}

const char* emu_last_error() { return fd::cuda::last_error(); }
}
