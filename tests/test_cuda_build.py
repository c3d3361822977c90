"""The CUDA kernels inside the built extension, read with cuobjdump on this GPU-less machine:
every __global__ function of csrc/cuda/ is compiled for every architecture of the build (sm_80
and sm_90 by default), with no local memory or stack (no register spills), and the row kernels
use 128-bit global loads and stores."""

import glob
import os
import re
import shutil
import subprocess

import pytest

from fastdistill.backends import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if _ext._C is None:
    pytest.skip(f"fastdistill._C is not built: {_ext.LOAD_ERROR}", allow_module_level=True)
if not _ext._C.has_cuda:
    pytest.skip("fastdistill._C was built without CUDA kernels (no nvcc at build time)",
                allow_module_level=True)

# Instantiations per architecture: distill 3 student dtypes x 6 divergences, feature 3 dtypes x
# (row in registers, streamed), scale 3 dtypes, topk 3 student dtypes (the divergence and the
# tail are run-time values: they only change the O(K) part of a row).
EXPECTED_COUNTS = {"distill_kernel": 21, "feature_kernel": 6, "scale_rows_kernel": 3,
                   "topk_kernel": 3}
ROW_KERNELS = ("distill_kernel", "feature_kernel", "scale_rows_kernel", "topk_kernel")


def _cuobjdump():
    candidates = []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.skip("cuobjdump not found (it ships in the triton wheel and in the CUDA toolkit)")


def _run(*args):
    out = subprocess.run([_cuobjdump(), *args, _ext._C.__file__], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _archs():
    """Architectures the module was built for (FASTDISTILL_CUDA_ARCHS at build time)."""
    return {int(a.replace("+PTX", "").replace(".", "")) for a in
            re.split(r"[;, ]+", _ext._C.cuda_archs.strip()) if a}


def _kernel_names():
    """Names of the __global__ functions defined in csrc/cuda/*.cu."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        src = open(path).read()
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(",
                                src))
    return names


def _base(mangled):
    for name in EXPECTED_COUNTS:
        if name in mangled:
            return name
    return None


@pytest.fixture(scope="module")
def usage():
    """[(arch, mangled function name, {REG, STACK, LOCAL, ...})] of every kernel."""
    rows, arch = [], None
    func = None
    for line in _run("--dump-resource-usage").splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            rows.append((arch, func, {k: int(v) for k, v in fields.items()}))
            func = None
    return rows


def test_default_build_targets_sm80_and_sm90():
    if "FASTDISTILL_CUDA_ARCHS" in os.environ:
        pytest.skip("FASTDISTILL_CUDA_ARCHS is set: a custom architecture list")
    assert _archs() == {80, 90}


def test_every_kernel_for_every_arch(usage):
    names = _kernel_names()
    assert names == set(EXPECTED_COUNTS), f"__global__ functions in csrc/cuda: {names}"
    archs = _archs()
    for arch in archs:
        here = [f for a, f, _ in usage if a == arch]
        for name, count in EXPECTED_COUNTS.items():
            got = [f for f in here if _base(f) == name]
            assert len(got) == count, f"sm_{arch}: {len(got)} instances of {name}, want {count}"
    assert {a for a, _, _ in usage} == archs
    # the same instances on every architecture
    per_arch = [{f for a, f, _ in usage if a == arch} for arch in archs]
    assert all(s == per_arch[0] for s in per_arch)


def test_no_local_memory_or_stack(usage):
    bad = [(a, f, u["LOCAL"], u["STACK"]) for a, f, u in usage
           if u.get("LOCAL", 0) != 0 or u.get("STACK", 0) != 0]
    assert not bad, f"kernels with local memory or stack (register spills): {bad}"


def test_register_budget(usage):
    """The distill kernels (256 threads) stay within 80 registers, so three blocks fit on an
    SM; every kernel fits its block size at all (64K registers per SM)."""
    for a, f, u in usage:
        if _base(f) == "distill_kernel":
            assert u["REG"] <= 80, (a, f, u["REG"])
        assert u["REG"] <= 128, (a, f, u["REG"])


def test_vectorised_global_access():
    """Every row kernel issues 128-bit loads and stores (LDG.E.128 / STG.E.128) on its
    aligned path."""
    func, seen = None, {}
    for line in _run("--dump-sass").splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            func = m.group(1)
            seen.setdefault(func, set())
        elif func and re.search(r"\b(LDG|STG)\.E\.128", line):
            seen[func].add(re.search(r"\b(LDG|STG)\.E\.128", line).group(1))
    rows = {f: s for f, s in seen.items() if _base(f) in ROW_KERNELS}
    assert rows
    missing = [f for f, s in rows.items() if s != {"LDG", "STG"}]
    assert not missing, f"kernels without 128-bit loads and stores: {missing}"
