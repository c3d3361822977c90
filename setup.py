"""Build script for fastdistill.

The extension module ``fastdistill._C`` is torch-free: it links no torch library and takes raw
pointers, so one binary serves every torch version. It is built with ninja from

* ``csrc/bindings.cpp`` and ``csrc/cpu/*.cpp`` (g++, -O3, OpenMP), always when a C++ compiler
  exists; the CPU row kernels are compiled once per x86 ISA level and picked at run time;
* ``csrc/cuda/*.cu`` when nvcc is found (``CUDA_HOME``/``CUDA_PATH`` or ``PATH``), for the
  architectures in ``FASTDISTILL_CUDA_ARCHS`` (default ``80;90``), cudart linked statically.

Environment:
  FASTDISTILL_BUILD_EXT=0      skip the extension (torch and triton backends only)
  FASTDISTILL_CUDA=0           skip the CUDA sources even when nvcc exists
  FASTDISTILL_CUDA_ARCHS       e.g. "80;90" or "90"; a trailing "+PTX" on one entry also embeds PTX
  FASTDISTILL_BUILD_JOBS       parallel compile jobs (default: number of CPUs)
  FASTDISTILL_BUILD_NINJA=0    compile without ninja even when it is installed

With no compiler at all the package still installs and works, and the build says once what is
missing. Building never downloads anything.
"""

import concurrent.futures
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "fastdistill", "_version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def log(msg):
    print(f"[fastdistill build] {msg}", flush=True)


def find_cuda_home():
    """Folder with bin/nvcc and the static cudart, or None."""
    if os.environ.get("FASTDISTILL_CUDA", "1") == "0":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a wrapper script; ask it where it lives.
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True,
                                 timeout=60).stderr
            m = re.search(r"^#\$ TOP=(.*)$", out, re.M)
            if m:
                candidates.append(os.path.normpath(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and cudart_static(home):
            return home
    return None


def cudart_static(home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        if os.path.exists(os.path.join(home, sub, "libcudart_static.a")):
            return os.path.join(home, sub)
    return None


def cuda_archs():
    """[(arch, with_ptx)] from FASTDISTILL_CUDA_ARCHS (default 80;90)."""
    out = []
    for a in re.split(r"[;, ]+", os.environ.get("FASTDISTILL_CUDA_ARCHS", "80;90").strip()):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "").replace(".", "")
        if not a.isdigit():
            raise ValueError(f"FASTDISTILL_CUDA_ARCHS: cannot read architecture {a!r}")
        out.append((a, ptx))
    return out


def cuda_gencode_flags():
    flags = []
    for a, ptx in cuda_archs():
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    return flags


# CPU row kernels are compiled once per ISA level; csrc/cpu/dispatch.cpp picks one at run time.
ISA_VARIANTS = {
    "base": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
}
ISA_SOURCES = ["csrc/cpu/distill_cpu.cpp", "csrc/cpu/feature_cpu.cpp"]


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64")


def skip_reason():
    """Why fastdistill._C cannot be built here, or None."""
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


class NinjaBuildExt(build_ext):
    """Compiles fastdistill._C with a generated build.ninja (parallel, incremental)."""

    def finalize_options(self):
        super().finalize_options()
        reason = skip_reason()
        if reason:
            # no extension at all: nothing for setuptools to copy or to put in the wheel
            log(f"{reason}: fastdistill._C is not built; the torch and triton backends work, the "
                "cpu and cuda backends are unavailable")
            self.extensions = []

    def build_extension(self, ext):
        import pybind11
        self._build(ext, os.environ.get("CXX", "c++"), pybind11.get_include())

    def _build(self, ext, cxx, pybind_inc):
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        # A fixed folder in the tree keeps ninja incremental across pip installs.
        build_dir = os.path.join(ROOT, "build", "fastdistill_C")
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        cu_dir = os.path.join(ROOT, "csrc", "cuda")
        has_cu = os.path.isdir(cu_dir) and any(f.endswith(".cu") for f in os.listdir(cu_dir))
        cuda_home = find_cuda_home() if has_cu else None
        with_cuda = cuda_home is not None

        inc = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
        py_inc = sysconfig.get_paths()["include"]
        # (shell-quoted: these are ninja command lines, and the fallback splits them like a shell)
        defines = [f"-DFD_WITH_CUDA={1 if with_cuda else 0}",
                   f"-DFD_VERSION=\\\"{read_version()}\\\""]
        if with_cuda:  # the architectures built, for the tests (module attribute cuda_archs)
            archs = ",".join(a for a, _ in cuda_archs())
            defines.append(f"-DFD_CUDA_ARCHS=\\\"{archs}\\\"")
        # -ffp-contract=off: see fd_fma in csrc/include/fastdistill/fast_math.h
        cflags = (["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                   "-ffp-contract=off",
                   "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
                  + [f"-I{p}" for p in inc] + defines)
        objs, rules = [], []
        src = lambda p: os.path.join(ROOT, p)  # noqa: E731

        rules.append(("cxx", src("csrc/bindings.cpp"), "bindings.o",
                      ["-isystem", pybind_inc, "-isystem", py_inc]))
        rules.append(("cxx", src("csrc/cpu/dispatch.cpp"), "dispatch.o", []))
        isas = ISA_VARIANTS if is_x86() else {"base": []}
        for s in ISA_SOURCES:
            stem = os.path.splitext(os.path.basename(s))[0]
            for isa, flags in isas.items():
                rules.append(("cxx", src(s), f"{stem}_{isa}.o", [f"-DFD_ISA={isa}"] + flags))
        for s in sorted(os.listdir(src("csrc/cpu"))):
            if s.endswith(".cpp") and f"csrc/cpu/{s}" not in ISA_SOURCES and s != "dispatch.cpp":
                rules.append(("cxx", src(f"csrc/cpu/{s}"), s[:-4] + ".o", []))

        ldflags = ["-shared", "-fopenmp"]
        nvcc_flags = []
        if with_cuda:
            nvcc = os.path.join(cuda_home, "bin", "nvcc")
            nvcc_flags = (["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                           "--expt-relaxed-constexpr", "-Xptxas", "-v", "-lineinfo"]
                          + [f"-I{p}" for p in inc] + defines + cuda_gencode_flags())
            for s in sorted(os.listdir(src("csrc/cuda"))):
                if s.endswith(".cu"):
                    rules.append(("nvcc", src(f"csrc/cuda/{s}"), s[:-3] + ".cu.o", []))
            ldflags += [f"-L{cudart_static(cuda_home)}", "-lcudart_static", "-ldl", "-lrt",
                        "-lpthread"]
            log(f"CUDA found at {cuda_home}: building the cuda backend ({' '.join(cuda_gencode_flags())})")
        else:
            log("nvcc not found (set CUDA_HOME): building without the cuda backend")

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {' '.join(cflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags $extra -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
        ]
        if with_cuda:
            lines += [
                f"nvcc = {nvcc}",
                f"nvcc_flags = {' '.join(nvcc_flags)}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvcc_flags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = NVCC $out",
            ]
        lines += ["rule link", "  command = $cxx $in -o $out $ldflags", "  description = LINK $out"]
        for kind, source, obj, extra in rules:
            objs.append(obj)
            lines.append(f"build {obj}: {kind} {source}")
            if extra:
                lines.append(f"  extra = {' '.join(extra)}")
        lines.append(f"build {out_path}: link {' '.join(objs)}")
        lines.append(f"  ldflags = {' '.join(ldflags)}")
        new = "\n".join(lines) + "\n"
        ninja_file = os.path.join(build_dir, "build.ninja")
        old = open(ninja_file).read() if os.path.exists(ninja_file) else None
        if old != new:
            with open(ninja_file, "w") as f:
                f.write(new)

        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg
                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError:
                ninja = None
        if os.environ.get("FASTDISTILL_BUILD_NINJA", "1") == "0":
            ninja = None
        jobs = int(os.environ.get("FASTDISTILL_BUILD_JOBS", str(os.cpu_count() or 1)))
        if ninja is not None:
            subprocess.run([ninja, "-C", build_dir, "-j", str(jobs)], check=True)
        else:  # the same commands without ninja: every object rebuilt, `jobs` at a time
            log(f"ninja not found (or FASTDISTILL_BUILD_NINJA=0): compiling {len(rules)} "
                f"sources, {jobs} at a time")
            cmds = []
            for kind, source, obj, extra in rules:
                flags = cflags + extra if kind == "cxx" else nvcc_flags
                tool = cxx if kind == "cxx" else nvcc
                cmds.append([tool] + shlex.split(" ".join(flags))
                            + ["-c", source, "-o", os.path.join(build_dir, obj)])
            with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
                for done in pool.map(lambda c: subprocess.run(c).returncode, cmds):
                    if done != 0:
                        raise RuntimeError("fastdistill._C: a compile command failed (see above)")
            subprocess.run([cxx] + [os.path.join(build_dir, o) for o in objs]
                           + ["-o", out_path] + shlex.split(" ".join(ldflags)), check=True)


setup(
    name="fastdistill",
    packages=find_packages(include=["fastdistill", "fastdistill.*"]),
    ext_modules=[Extension("fastdistill._C", sources=[])],
    cmdclass={"build_ext": NinjaBuildExt},
)
