// The pybind11 module fastdistill._C. It links no torch library: a kernel call takes one of the
// argument structs of csrc/include/fastdistill/args.h (bound here as Python classes whose pointer
// fields are integers) and returns a Status code. fastdistill/backends/_ext.py fills the structs
// from tensors and checks every argument first.
#include <pybind11/pybind11.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"
#include "fastdistill/args.h"
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

// A pointer field of struct S, read and written from Python as an integer address.
template <typename S, typename T>
void pointer(py::class_<S>& c, const char* name, T* S::*field) {
  c.def_property(
      name, [field](const S& s) { return reinterpret_cast<uintptr_t>(s.*field); },
      [field](S& s, uintptr_t p) { s.*field = reinterpret_cast<T*>(p); });
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

// The struct's own address, so that the tests' host emulation of the CUDA kernels (a separate
// library, tests/cuda_emu/) runs on the very struct this module filled.
template <typename S>
void address(py::class_<S>& c) {
  c.def_property_readonly("address", [](const S& s) { return reinterpret_cast<uintptr_t>(&s); });
}

template <typename Args, int32_t (*Fn)(const Args&)>
int32_t nogil(const Args& a) {
  py::gil_scoped_release release;
  return Fn(a);
}

}  // namespace

namespace fastdistill {
void register_build_info(py::module_& m);  // csrc/build_info.cpp
}  // namespace fastdistill

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdistill kernels (torch-free; argument structs in, status codes out)";
  m.attr("version") = FD_VERSION;
  m.attr("has_cuda") = bool(FD_WITH_CUDA);

  py::class_<fd::DistillParams>(m, "DistillParams")
      .def(py::init<>())
      .def_readwrite("divergence", &fd::DistillParams::divergence)
      .def_readwrite("beta", &fd::DistillParams::beta)
      .def_readwrite("s_mul", &fd::DistillParams::s_mul)
      .def_readwrite("t_mul", &fd::DistillParams::t_mul)
      .def_readwrite("h_mul", &fd::DistillParams::h_mul)
      .def_readwrite("h_ratio", &fd::DistillParams::h_ratio)
      .def_readwrite("soft_scale", &fd::DistillParams::soft_scale)
      .def_readwrite("hard_weight", &fd::DistillParams::hard_weight)
      .def_readwrite("ignore_index", &fd::DistillParams::ignore_index)
      .def_readwrite("vocab", &fd::DistillParams::vocab);

  py::class_<fd::DistillArgs> da(m, "DistillArgs");
  da.def(py::init<>())
      .def_readwrite("s_dtype", &fd::DistillArgs::s_dtype)
      .def_readwrite("s_stride", &fd::DistillArgs::s_stride)
      .def_readwrite("t_dtype", &fd::DistillArgs::t_dtype)
      .def_readwrite("t_stride", &fd::DistillArgs::t_stride)
      .def_readwrite("g_stride", &fd::DistillArgs::g_stride)
      .def_readwrite("grad_width", &fd::DistillArgs::grad_width)
      .def_readwrite("n_rows", &fd::DistillArgs::n_rows)
      .def_readwrite("params", &fd::DistillArgs::params)
      .def_readwrite("num_threads", &fd::DistillArgs::num_threads);
  pointer(da, "student", &fd::DistillArgs::student);
  pointer(da, "teacher", &fd::DistillArgs::teacher);
  pointer(da, "labels", &fd::DistillArgs::labels);
  pointer(da, "grad", &fd::DistillArgs::grad);
  pointer(da, "loss_rows", &fd::DistillArgs::loss_rows);
  pointer(da, "grad_scale", &fd::DistillArgs::grad_scale);
  pointer(da, "stream", &fd::DistillArgs::stream);
  address(da);

  py::class_<fd::FeatureArgs> fa(m, "FeatureArgs");
  fa.def(py::init<>())
      .def_readwrite("s_dtype", &fd::FeatureArgs::s_dtype)
      .def_readwrite("s_stride", &fd::FeatureArgs::s_stride)
      .def_readwrite("t_dtype", &fd::FeatureArgs::t_dtype)
      .def_readwrite("t_stride", &fd::FeatureArgs::t_stride)
      .def_readwrite("g_stride", &fd::FeatureArgs::g_stride)
      .def_readwrite("n_rows", &fd::FeatureArgs::n_rows)
      .def_readwrite("dim", &fd::FeatureArgs::dim)
      .def_readwrite("kind", &fd::FeatureArgs::kind)
      .def_readwrite("num_threads", &fd::FeatureArgs::num_threads);
  pointer(fa, "student", &fd::FeatureArgs::student);
  pointer(fa, "teacher", &fd::FeatureArgs::teacher);
  pointer(fa, "mask", &fd::FeatureArgs::mask);
  pointer(fa, "grad", &fd::FeatureArgs::grad);
  pointer(fa, "loss_rows", &fd::FeatureArgs::loss_rows);
  pointer(fa, "grad_scale", &fd::FeatureArgs::grad_scale);
  pointer(fa, "stream", &fd::FeatureArgs::stream);
  address(fa);

  py::class_<fd::ScaleArgs> sa(m, "ScaleArgs");
  sa.def(py::init<>())
      .def_readwrite("dtype", &fd::ScaleArgs::dtype)
      .def_readwrite("stride", &fd::ScaleArgs::stride)
      .def_readwrite("n_rows", &fd::ScaleArgs::n_rows)
      .def_readwrite("width", &fd::ScaleArgs::width)
      .def_readwrite("per_row", &fd::ScaleArgs::per_row);
  pointer(sa, "grad", &fd::ScaleArgs::grad);
  pointer(sa, "factor", &fd::ScaleArgs::factor);
  pointer(sa, "stream", &fd::ScaleArgs::stream);
  address(sa);

  py::class_<fd::TopkParams>(m, "TopkParams")
      .def(py::init<>())
      .def_readwrite("divergence", &fd::TopkParams::divergence)
      .def_readwrite("beta", &fd::TopkParams::beta)
      .def_readwrite("s_mul", &fd::TopkParams::s_mul)
      .def_readwrite("h_mul", &fd::TopkParams::h_mul)
      .def_readwrite("soft_scale", &fd::TopkParams::soft_scale)
      .def_readwrite("hard_weight", &fd::TopkParams::hard_weight)
      .def_readwrite("ignore_index", &fd::TopkParams::ignore_index)
      .def_readwrite("vocab", &fd::TopkParams::vocab)
      .def_readwrite("k", &fd::TopkParams::k)
      .def_readwrite("tail", &fd::TopkParams::tail);

  py::class_<fd::TopkArgs> ta(m, "TopkArgs");
  ta.def(py::init<>())
      .def_readwrite("s_dtype", &fd::TopkArgs::s_dtype)
      .def_readwrite("s_stride", &fd::TopkArgs::s_stride)
      .def_readwrite("i_dtype", &fd::TopkArgs::i_dtype)
      .def_readwrite("i_stride", &fd::TopkArgs::i_stride)
      .def_readwrite("l_dtype", &fd::TopkArgs::l_dtype)
      .def_readwrite("l_stride", &fd::TopkArgs::l_stride)
      .def_readwrite("g_stride", &fd::TopkArgs::g_stride)
      .def_readwrite("grad_width", &fd::TopkArgs::grad_width)
      .def_readwrite("n_rows", &fd::TopkArgs::n_rows)
      .def_readwrite("params", &fd::TopkArgs::params)
      .def_readwrite("num_threads", &fd::TopkArgs::num_threads);
  pointer(ta, "student", &fd::TopkArgs::student);
  pointer(ta, "indices", &fd::TopkArgs::indices);
  pointer(ta, "logprobs", &fd::TopkArgs::logprobs);
  pointer(ta, "labels", &fd::TopkArgs::labels);
  pointer(ta, "grad", &fd::TopkArgs::grad);
  pointer(ta, "loss_rows", &fd::TopkArgs::loss_rows);
  pointer(ta, "grad_scale", &fd::TopkArgs::grad_scale);
  pointer(ta, "work", &fd::TopkArgs::work);
  pointer(ta, "stream", &fd::TopkArgs::stream);
  address(ta);

  m.def("cpu_isa", &fd::cpu::isa_name, "ISA variant of the host kernels in use");
  m.def("topk_cpu", &nogil<fd::TopkArgs, fd::cpu::best::topk_rows>,
        "top-k (sparse teacher) distillation loss and gradient, host");
  m.def("distill_cpu", &nogil<fd::DistillArgs, fd::cpu::best::distill_rows>,
        "logit-level distillation loss and gradient, host");
  m.def("feature_cpu", &nogil<fd::FeatureArgs, fd::cpu::best::feature_rows>,
        "feature loss and gradient, host");
  m.def("advise_hugepages", &advise_hugepages, "madvise(MADV_HUGEPAGE) on a fresh buffer");
#if FD_WITH_CUDA
  m.attr("cuda_archs") = FD_CUDA_ARCHS;  // compute capabilities with kernels, e.g. "80,90"
  m.def("distill_cuda", &nogil<fd::DistillArgs, fd::cuda::distill_rows>,
        "logit-level distillation loss and gradient, CUDA");
  m.def("feature_cuda", &nogil<fd::FeatureArgs, fd::cuda::feature_rows>,
        "feature loss and gradient, CUDA");
  m.def("topk_cuda", &nogil<fd::TopkArgs, fd::cuda::topk_rows>,
        "top-k (sparse teacher) distillation loss and gradient, CUDA");
  m.def("scale_rows_cuda", &nogil<fd::ScaleArgs, fd::cuda::scale_rows>,
        "in-place row scaling of a gradient, CUDA");
  m.def("cuda_last_error", &fd::cuda::last_error,
        "message of the last CUDA error returned to this thread");
#endif
  fd::register_build_info(m);
}
