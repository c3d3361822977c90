"""Build script of fastdistill: the Python package plus the extension module fastdistill._C.

fastdistill._C links no torch library (its kernels take raw pointers, sizes and a stream), so one
binary serves every torch version. setup.py writes a build.ninja and runs ninja (a declared build
requirement) on it:

  csrc/*.cpp, csrc/cpu/*.cpp   g++ -O3 -fopenmp, always when a C++ compiler exists. A source that
                               opens `namespace FD_ISA` is compiled once per x86 ISA level (base,
                               avx2, avx512); csrc/cpu/dispatch.cpp picks one at run time.
  csrc/cuda/*.cu               when nvcc is found (CUDA_HOME, CUDA_PATH or PATH), for the
                               architectures of FASTDISTILL_CUDA_ARCHS; cudart linked statically.

Environment:
  FASTDISTILL_BUILD_EXT=0   no extension: the package installs as pure Python (torch, triton)
  FASTDISTILL_CUDA=0        no CUDA kernels, even when nvcc exists
  FASTDISTILL_CUDA_ARCHS    default "80;90+PTX": SASS for sm_80 and sm_90, and compute_90 PTX that
                            newer GPUs compile at load time; e.g. "90" for one architecture only
  FASTDISTILL_BUILD_JOBS    parallel compile jobs (default: ninja's choice)
  FASTDISTILL_BUILD_DIR     where objects go (default: build/fastdistill_C in this tree)

With no C++ compiler the package still installs (pure Python) and the build says once why.
Nothing is downloaded. `python -c "import fastdistill._C as C; print(C.build_info())"` shows what
was built.
"""

import os
import platform
import re
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "(.+)"',
                    open(os.path.join(ROOT, "fastdistill", "_version.py")).read()).group(1)

# -ffp-contract=off: see fd_fma in csrc/include/fastdistill/fast_math.h. Never -ffast-math (-inf).
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
            "-ffp-contract=off", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
NVCCFLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden",
             "--expt-relaxed-constexpr", "-Xptxas", "-v", "-lineinfo"]
ISA_FLAGS = {"base": [], "avx2": ["-mavx2", "-mfma", "-mf16c"],
             "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
                        "-mf16c"]}
# --exclude-libs: the static cudart stays private to the module, so it never resolves to (or
# stands in for) the libcudart.so that torch loads into the same process.
LDFLAGS = ["-shared", "-fopenmp", "-Wl,--exclude-libs,ALL"]


def log(msg):
    print(f"[fastdistill build] {msg}", flush=True)


def skip_reason():
    """Why fastdistill._C is not built here, or None."""
    if os.environ.get("FASTDISTILL_BUILD_EXT", "1") == "0":
        return "FASTDISTILL_BUILD_EXT=0"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set CXX)"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    return None


def find_ninja():
    try:  # the ninja package of the build environment
        import ninja
        if ninja.BIN_DIR and os.path.isfile(os.path.join(ninja.BIN_DIR, "ninja")):
            return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        pass
    if shutil.which("ninja"):
        return shutil.which("ninja")
    raise RuntimeError("fastdistill._C needs ninja to build: `pip install ninja` (a build "
                       "requirement in pyproject.toml, installed by pip unless "
                       "--no-build-isolation), or FASTDISTILL_BUILD_EXT=0 for pure Python")


def find_cuda():
    """(nvcc, folder of libcudart_static.a, (major, minor)) or None."""
    if os.environ.get("FASTDISTILL_CUDA", "1") == "0":
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):  # a symlink leads into the toolkit (a wrapper script does not)
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        nvcc = os.path.join(home, "bin", "nvcc")
        libs = [os.path.join(home, sub) for sub in ("lib64", "lib", "targets/x86_64-linux/lib",
                                                    "targets/sbsa-linux/lib")]
        libs = [d for d in libs if os.path.exists(os.path.join(d, "libcudart_static.a"))]
        if os.path.exists(nvcc) and libs:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            version = tuple(int(v) for v in re.search(r"release (\d+)\.(\d+)", out).groups())
            return nvcc, libs[0], version
    return None


def cuda_archs():
    """(SASS archs, PTX archs) from FASTDISTILL_CUDA_ARCHS, e.g. "80;90+PTX" -> ([80, 90], [90])."""
    sass, ptx = [], []
    spec = os.environ.get("FASTDISTILL_CUDA_ARCHS", "80;90+PTX")
    for entry in filter(None, re.split(r"[;, ]+", spec)):
        arch = entry.upper().replace("+PTX", "").replace(".", "")
        if not arch.isdigit():
            raise ValueError(f"FASTDISTILL_CUDA_ARCHS: cannot read {entry!r}; expected entries "
                             "like 80, 9.0 or 90+PTX separated by ';'")
        sass.append(int(arch))
        if entry.upper().endswith("+PTX"):
            ptx.append(int(arch))
    if not sass:
        raise ValueError("FASTDISTILL_CUDA_ARCHS is empty; FASTDISTILL_CUDA=0 builds without CUDA")
    return sass, ptx


def write_if_changed(path, text):
    """Unchanged files keep their timestamps, so ninja rebuilds nothing for them."""
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def c_str(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def translation_units(csrc, cuda, isas):
    """(rule, source, object, extra flags) of every source file of fastdistill._C."""
    import pybind11
    python_headers = ["-isystem", pybind11.get_include(), "-isystem",
                      sysconfig.get_paths()["include"]]
    units = []
    for folder in ("", "cpu", "cuda"):
        for name in sorted(os.listdir(os.path.join(csrc, folder))):
            src, (stem, ext) = os.path.join(csrc, folder, name), os.path.splitext(name)
            text = open(src).read() if ext in (".cpp", ".cu") else ""
            if ext == ".cu" and cuda:
                units.append(("nvcc", src, f"{stem}.cu.o", []))
            elif ext == ".cpp" and "namespace FD_ISA" in text:
                units += [("cxx", src, f"{stem}_{isa}.o", [f"-DFD_ISA={isa}"] + ISA_FLAGS[isa])
                          for isa in isas]
            elif ext == ".cpp":  # only the pybind11 sources depend on Python's headers
                units.append(("cxx", src, f"{stem}.o",
                              python_headers if "<pybind11/" in text else []))
    return units


class NinjaBuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        reason = skip_reason()
        if reason:  # nothing for setuptools to build, copy or put in the wheel
            log(f"{reason}: fastdistill._C is not built; the torch and triton backends work, the "
                "cpu and cuda backends are unavailable")
            self.extensions = []

    def build_extension(self, ext):
        # One fixed folder, not setuptools' build_temp: pip and editable installs build in
        # throwaway folders, and ninja is incremental only where its outputs stay. Only the
        # pybind11 sources depend on the Python version, so wheels for several Pythons built one
        # after another (cibuildwheel) compile the kernels once.
        build_dir = os.path.abspath(os.environ.get("FASTDISTILL_BUILD_DIR")
                                    or os.path.join(ROOT, "build", "fastdistill_C"))
        os.makedirs(build_dir, exist_ok=True)
        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        csrc = os.path.join(ROOT, "csrc")
        cuda = find_cuda() if any(f.endswith(".cu") for f in os.listdir(f"{csrc}/cuda")) else None
        sass, ptx = cuda_archs() if cuda else ([], [])
        isas = list(ISA_FLAGS) if platform.machine().lower() in ("x86_64", "amd64") else ["base"]

        defines = [f"-I{csrc}/include", f"-I{csrc}", f"-I{build_dir}",
                   f"-DFD_WITH_CUDA={int(bool(cuda))}", f'-DFD_VERSION=\\"{VERSION}\\"']
        nvccflags, ldflags = list(NVCCFLAGS), list(LDFLAGS)
        if cuda:
            nvcc, cudart_dir, version = cuda
            defines += [f"-I{os.path.dirname(os.path.dirname(nvcc))}/include",
                        f'-DFD_CUDA_ARCHS=\\"{",".join(map(str, sass))}\\"']
            nvccflags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass]
            nvccflags += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]
            if version >= (12, 8):  # a third of the size of the default fatbin compression
                nvccflags.append("--compress-mode=size")
            ldflags += [f"-L{cudart_dir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
            log(f"CUDA {version[0]}.{version[1]} ({nvcc}): SASS for "
                + " ".join(f"sm_{a}" for a in sass) + ", PTX for "
                + (" ".join(f"compute_{a}" for a in ptx) or "none"))
        else:
            log("building without the cuda backend (nvcc not found, or FASTDISTILL_CUDA=0; set "
                "CUDA_HOME to the toolkit)")

        # the facts that _C.build_info() reports (csrc/build_info.cpp)
        write_if_changed(os.path.join(build_dir, "fd_build_config.h"), "".join(
            f"#define FD_BUILD_{key} {c_str(value)}\n" for key, value in [
                ("CXX_FLAGS", " ".join(CXXFLAGS)),
                ("NVCC_FLAGS", " ".join(nvccflags) if cuda else ""),
                ("LD_FLAGS", " ".join(ldflags)), ("ISAS", ",".join(isas)),
                ("CUDA_SASS", ",".join(map(str, sass))), ("CUDA_PTX", ",".join(map(str, ptx)))]))

        units = translation_units(csrc, cuda, isas)
        lines = [f"cxx = {os.environ.get('CXX', 'c++')}",
                 f"cxxflags = {' '.join(CXXFLAGS + defines)}",
                 f"nvcc = {cuda[0] if cuda else 'nvcc'}",
                 f"nvccflags = {' '.join(nvccflags + defines)}",
                 "rule cxx",
                 "  command = $cxx -MMD -MF $out.d $cxxflags $extra -c $in -o $out",
                 "  depfile = $out.d",
                 "  deps = gcc",
                 "rule nvcc",
                 "  command = $nvcc -MD -MF $out.d $nvccflags -c $in -o $out",
                 "  depfile = $out.d",
                 "  deps = gcc",
                 "rule link",
                 f"  command = $cxx $in -o $out {' '.join(ldflags)}"]
        for rule, src, obj, extra in units:
            lines.append(f"build {obj}: {rule} {src}")
            lines += [f"  extra = {' '.join(extra)}"] if extra else []
        lines.append(f"build {out}: link {' '.join(obj for _, _, obj, _ in units)}")
        write_if_changed(os.path.join(build_dir, "build.ninja"), "\n".join(lines) + "\n")

        jobs = os.environ.get("FASTDISTILL_BUILD_JOBS")
        subprocess.run([find_ninja(), "-C", build_dir] + (["-j", jobs] if jobs else []),
                       check=True)


setup(
    ext_modules=[Extension("fastdistill._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
)
