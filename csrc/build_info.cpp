// fastdistill._C.build_info(): how this binary was built, as a dict (what
// `python -m fastdistill.info` prints). The flags and architectures come from setup.py through
// fd_build_config.h; the rest from the compiler and the headers used.
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/kernels.h"
#include "fd_build_config.h"
#if FD_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace fastdistill {
namespace {

py::list split(const std::string& csv, bool as_int) {
  py::list out;
  size_t start = 0;
  while (start < csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    const std::string item = csv.substr(start, end - start);
    if (as_int)
      out.append(std::stoi(item));
    else
      out.append(item);
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = FD_VERSION;
#if defined(__clang__)
  d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "gcc " __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#if defined(__x86_64__)
  d["machine"] = "x86_64";
#elif defined(__aarch64__)
  d["machine"] = "aarch64";
#else
  d["machine"] = "other";
#endif
  d["cxx_flags"] = FD_BUILD_CXX_FLAGS;
  d["ld_flags"] = FD_BUILD_LD_FLAGS;
  d["cpu_isas"] = split(FD_BUILD_ISAS, false);  // compiled variants of the host kernels
  d["cpu_isa"] = cpu::isa_name();                // the one this CPU runs
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
#else
  d["openmp"] = py::none();
#endif
  d["python"] = PY_VERSION;  // the headers compiled against
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                  std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  d["cuda"] = bool(FD_WITH_CUDA);
#if FD_WITH_CUDA
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string(CUDART_VERSION % 1000 / 10);
  d["cudart"] = "static";
#else
  d["cuda_version"] = py::none();
  d["cudart"] = py::none();
#endif
  d["nvcc_flags"] = FD_BUILD_NVCC_FLAGS;
  d["cuda_sass"] = split(FD_BUILD_CUDA_SASS, true);  // e.g. [80, 90]: sm_80, sm_90 machine code
  d["cuda_ptx"] = split(FD_BUILD_CUDA_PTX, true);    // e.g. [90]: compute_90 PTX, JIT on newer GPUs
  return d;
}

}  // namespace

void register_build_info(py::module_& m) {
  m.def("build_info", &build_info,
        "how this binary was built: version, compiler and flags, host ISA variants and the one "
        "in use, CUDA version and architectures (SASS and PTX)");
#if FD_WITH_CUDA
  m.def(
      "cuda_driver_version",
      [] {
        int v = 0;  // stays 0 without a driver
        cudaDriverGetVersion(&v);
        return v;
      },
      "CUDA version the installed NVIDIA driver supports, e.g. 13000 (0: no driver); creates no "
      "context");
#endif
}

}  // namespace fastdistill
