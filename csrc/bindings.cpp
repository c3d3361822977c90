// The pybind11 module fastdistill._C. It links no torch library: every function takes raw
// pointers (as integers), sizes, strides, dtype codes and, for CUDA, a stream handle, and returns
// a Status code. fastdistill/backends/_ext.py checks every argument before a pointer gets here.
#include <pybind11/pybind11.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"
#include "fastdistill/divergence.h"
#if FD_WITH_CUDA
#include "cuda/launchers.h"
#ifndef FD_CUDA_ARCHS
#define FD_CUDA_ARCHS ""
#endif
#endif

namespace py = pybind11;
namespace fd = fastdistill;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

int32_t distill_cpu(uintptr_t student, int32_t s_dtype, int64_t s_stride, uintptr_t teacher,
                    int32_t t_dtype, int64_t t_stride, uintptr_t labels, uintptr_t grad,
                    int64_t g_stride, int64_t grad_width, uintptr_t loss_rows, int64_t n_rows,
                    int32_t divergence, float beta, float inv_temperature, float soft_scale,
                    float hard_weight, int64_t ignore_index, int64_t vocab, float grad_scale,
                    int32_t num_threads) {
  const fd::DistillParams p{divergence, beta, inv_temperature, soft_scale,
                              hard_weight, ignore_index, vocab};
  py::gil_scoped_release nogil;
  return fd::cpu::best::distill_rows(ptr<const void>(student), s_dtype, s_stride,
                                     ptr<const void>(teacher), t_dtype, t_stride,
                                     ptr<const int64_t>(labels), ptr<void>(grad), g_stride,
                                     grad_width, ptr<float>(loss_rows), n_rows, p, grad_scale,
                                     num_threads);
}

int32_t feature_cpu(uintptr_t student, int32_t s_dtype, int64_t s_stride, uintptr_t teacher,
                    int32_t t_dtype, int64_t t_stride, uintptr_t mask, uintptr_t grad,
                    int64_t g_stride, uintptr_t loss_rows, int64_t n_rows, int64_t dim,
                    int32_t kind, float grad_scale, int32_t num_threads) {
  py::gil_scoped_release nogil;
  return fd::cpu::best::feature_rows(ptr<const void>(student), s_dtype, s_stride,
                                     ptr<const void>(teacher), t_dtype, t_stride,
                                     ptr<const bool>(mask), ptr<void>(grad), g_stride,
                                     ptr<float>(loss_rows), n_rows, dim, kind, grad_scale,
                                     num_threads);
}

// Ask for transparent huge pages on a fresh buffer before its first touch. On CPU the first
// write to a freshly mmap'ed gradient costs one page fault per 4 KiB, which can take longer than
// the kernel itself; with 2 MiB pages it costs 512 times fewer. Best effort (returns false when
// the kernel declines or the range holds no whole huge page).
bool advise_hugepages(uintptr_t p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t a = (p + huge - 1) / huge * huge, e = (p + (uintptr_t)bytes) / huge * huge;
  if (e <= a) return false;
  return madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

#if FD_WITH_CUDA
// The CUDA launchers: grad_scale (and factor) are device pointers to float32 scalars, read by the
// kernels; `stream` is the cudaStream_t to enqueue on. Nothing here synchronises.
int32_t distill_cuda(uintptr_t student, int32_t s_dtype, int64_t s_stride, uintptr_t teacher,
                     int32_t t_dtype, int64_t t_stride, uintptr_t labels, uintptr_t grad,
                     int64_t g_stride, int64_t grad_width, uintptr_t loss_rows, int64_t n_rows,
                     int32_t divergence, float beta, float inv_temperature, float soft_scale,
                     float hard_weight, int64_t ignore_index, int64_t vocab, uintptr_t grad_scale,
                     uintptr_t stream) {
  const fd::DistillParams p{divergence, beta, inv_temperature, soft_scale,
                              hard_weight, ignore_index, vocab};
  py::gil_scoped_release nogil;
  return fd::cuda::distill_rows(ptr<const void>(student), s_dtype, s_stride,
                                ptr<const void>(teacher), t_dtype, t_stride,
                                ptr<const int64_t>(labels), ptr<void>(grad), g_stride, grad_width,
                                ptr<float>(loss_rows), n_rows, p, ptr<const float>(grad_scale),
                                ptr<void>(stream));
}

int32_t feature_cuda(uintptr_t student, int32_t s_dtype, int64_t s_stride, uintptr_t teacher,
                     int32_t t_dtype, int64_t t_stride, uintptr_t mask, uintptr_t grad,
                     int64_t g_stride, uintptr_t loss_rows, int64_t n_rows, int64_t dim,
                     int32_t kind, uintptr_t grad_scale, uintptr_t stream) {
  py::gil_scoped_release nogil;
  return fd::cuda::feature_rows(ptr<const void>(student), s_dtype, s_stride,
                                ptr<const void>(teacher), t_dtype, t_stride,
                                ptr<const bool>(mask), ptr<void>(grad), g_stride,
                                ptr<float>(loss_rows), n_rows, dim, kind,
                                ptr<const float>(grad_scale), ptr<void>(stream));
}

int32_t scale_rows_cuda(uintptr_t grad, int32_t dtype, int64_t stride, int64_t n_rows,
                        int64_t width, uintptr_t factor, bool per_row, uintptr_t stream) {
  py::gil_scoped_release nogil;
  return fd::cuda::scale_rows(ptr<void>(grad), dtype, stride, n_rows, width,
                              ptr<const float>(factor), per_row, ptr<void>(stream));
}
#endif

}  // namespace

namespace fastdistill {
void register_build_info(py::module_& m);  // csrc/build_info.cpp
}  // namespace fastdistill

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistill kernels (torch-free; pointers in, status codes out)";
  m.attr("version") = FD_VERSION;
  m.attr("has_cuda") = bool(FD_WITH_CUDA);
  m.def("cpu_isa", &fd::cpu::isa_name, "ISA variant of the host kernels in use");
  m.def("distill_cpu", &distill_cpu, "logit-level distillation loss and gradient, host");
  m.def("feature_cpu", &feature_cpu, "feature loss and gradient, host");
  m.def("advise_hugepages", &advise_hugepages, "madvise(MADV_HUGEPAGE) on a fresh buffer");
#if FD_WITH_CUDA
  m.attr("cuda_archs") = FD_CUDA_ARCHS;  // compute capabilities with kernels, e.g. "80,90"
  m.def("distill_cuda", &distill_cuda, "logit-level distillation loss and gradient, CUDA");
  m.def("feature_cuda", &feature_cuda, "feature loss and gradient, CUDA");
  m.def("scale_rows_cuda", &scale_rows_cuda, "in-place row scaling of a gradient, CUDA");
  m.def("cuda_last_error", &fd::cuda::last_error,
        "message of the last CUDA error returned to this thread");
#endif
  fd::register_build_info(m);
}
