"""The compiled extension and the build: torch-free, versioned, its own report of how it was
built; the package installs without a compiler; and from a fresh copy of the tree the Triton
kernels import in each way the package can be used: an in-place build on PYTHONPATH, an editable
install and an installed wheel (the three build once, without CUDA, sharing one object folder)."""

import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_wheel  # noqa: E402  (scripts/check_wheel.py: fresh environments beside torch)


def _so_path():
    assert _ext._C is not None, f"fastdistill._C is not built: {_ext.LOAD_ERROR}"
    return _ext._C.__file__


def test_extension_built_and_versioned():
    assert _ext._C.version == fd.__version__
    assert _ext._C.cpu_isa() in ("avx512", "avx2", "base")


def test_extension_links_no_torch_or_python():
    out = subprocess.run(["readelf", "-d", _so_path()], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert needed, out
    for lib in needed:
        assert not any(x in lib for x in ("torch", "c10", "python", "cudart", "libcuda")), needed


def test_extension_exports_only_its_init_and_no_cuda_runtime():
    """The static cudart stays private (-Wl,--exclude-libs,ALL): torch's own libcudart in the
    same process can neither bind to it nor replace it."""
    out = subprocess.run(["readelf", "-W", "--dyn-syms", _so_path()], capture_output=True,
                         text=True, check=True).stdout
    exported = [line.split()[-1] for line in out.splitlines()
                if re.search(r"\s(FUNC|OBJECT)\s+(GLOBAL|WEAK)\s+DEFAULT\s+\d+\s", line)]
    assert "PyInit__C" in exported
    assert not [s for s in exported if re.match(r"(cuda[A-Z]|__cuda|cu[A-Z])", s)], exported


def test_build_info_reports_the_build():
    b = _ext._C.build_info()
    assert b["version"] == fd.__version__
    assert b["python"] == platform.python_version()
    flags = b["cxx_flags"].split()
    assert "-ffp-contract=off" in flags and "-O3" in flags
    assert not [f for f in flags + b["nvcc_flags"].split()
                if f in ("-ffast-math", "-Ofast", "--use_fast_math", "-use_fast_math")]
    if platform.machine() == "x86_64":
        assert b["cpu_isas"] == ["base", "avx2", "avx512"]
    assert b["cpu_isa"] == _ext._C.cpu_isa() and b["cpu_isa"] in b["cpu_isas"]
    assert b["cuda"] == _ext._C.has_cuda
    if not b["cuda"]:
        assert b["cuda_sass"] == b["cuda_ptx"] == [] and b["cuda_version"] is None
        return
    assert b["cudart"] == "static" and "-lcudart_static" in b["ld_flags"]
    assert re.fullmatch(r"\d+\.\d+", b["cuda_version"])
    assert _ext._C.cuda_archs == ",".join(map(str, b["cuda_sass"]))
    for a in b["cuda_sass"]:
        assert f"-gencode=arch=compute_{a},code=sm_{a}" in b["nvcc_flags"]
    for a in b["cuda_ptx"]:
        assert f"-gencode=arch=compute_{a},code=compute_{a}" in b["nvcc_flags"]
    if "FASTDISTILL_CUDA_ARCHS" not in os.environ:  # the default: SASS 80, 90 + PTX 90
        assert (b["cuda_sass"], b["cuda_ptx"]) == ([80, 90], [90])
    assert isinstance(_ext._C.cuda_driver_version(), int)  # 0 without a driver, never raises


# ---- from a fresh copy of the tree --------------------------------------------------------

IMPORT_CHECK = r"""
import importlib, pkgutil, sys
import fastdistill as fd, fastdistill.kernels as k
from fastdistill.backends import _ext
assert _ext._C is not None, _ext.LOAD_ERROR
mods = [m.name for m in pkgutil.iter_modules(k.__path__, "fastdistill.kernels.")]
for m in mods:
    importlib.import_module(m)
assert "fastdistill.kernels.distill" in mods, mods
print(fd.__file__)
print(k.__file__)
"""


def copy_tree(dest):
    """The files of this checkout that git tracks or would track (uncommitted ones included;
    ignored build outputs excluded), copied to dest."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):  # a tracked file may be deleted in the work tree
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))
    return dest


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    src = copy_tree(str(tmp / "src"))
    assert not os.path.exists(os.path.join(src, "build"))
    env = dict(check_wheel.clean_env(), FASTDISTILL_CUDA="0",
               FASTDISTILL_BUILD_DIR=str(tmp / "objects"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return tmp, src, env


def _run(cmd, env, cwd, stderr=False):
    """stdout of cmd (and its stderr after it with stderr=True); fails the test on an error."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + (out.stderr if stderr else "")


def _imports(py, env, cwd):
    """(fastdistill's file, fastdistill.kernels' file) as `py` imports them from cwd."""
    fd_file, kernels_file = _run([str(py), "-c", IMPORT_CHECK], env, cwd).split()
    return fd_file, kernels_file


def test_fresh_tree_in_place_build_imports_kernels_from_pythonpath(fresh):
    tmp, src, env = fresh
    _run([sys.executable, "setup.py", "build_ext", "--inplace"], env, src)
    # incremental: nothing is compiled again
    assert "ninja: no work to do." in _run([sys.executable, "setup.py", "build_ext", "--inplace"],
                                           env, src)
    fd_file, kernels_file = _imports(sys.executable, dict(env, PYTHONPATH=src), str(tmp))
    assert fd_file == os.path.join(src, "fastdistill", "__init__.py")
    assert kernels_file == os.path.join(src, "fastdistill", "kernels", "__init__.py")


def test_fresh_tree_editable_install_imports_kernels(fresh):
    tmp, src, env = fresh
    py = check_wheel.venv_beside_torch(str(tmp / "venv-editable"))
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-build-isolation",
          "--no-deps", "-e", src], env, src)
    fd_file, kernels_file = _imports(py, env, str(tmp))
    assert fd_file == os.path.join(src, "fastdistill", "__init__.py")
    assert kernels_file == os.path.join(src, "fastdistill", "kernels", "__init__.py")


def test_fresh_tree_wheel_imports_kernels(fresh):
    tmp, src, env = fresh
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
          str(tmp / "dist"), src], env, src)
    (wheel,) = (tmp / "dist").glob("fastdistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdistill/kernels/distill.py" in names
    assert any(re.match(r"fastdistill/_C\..*\.so$", n) for n in names), names
    py = check_wheel.venv_beside_torch(str(tmp / "venv-wheel"))
    check_wheel.pip_install(py, str(wheel))
    fd_file, kernels_file = _imports(py, env, str(tmp))
    site = os.path.join(str(tmp / "venv-wheel"), "lib")
    assert fd_file.startswith(site) and kernels_file.startswith(site), (fd_file, kernels_file)


def test_sdist_carries_the_sources(fresh):
    tmp, src, env = fresh
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "sdist")], env, src)
    (sdist,) = (tmp / "sdist").glob("fastdistill-*.tar.gz")
    import tarfile
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "csrc", "scripts"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    missing = [f for f in tracked + ["LICENSE", "CHANGELOG.md", "README.md", "setup.py",
                                     "pyproject.toml", "fastdistill/kernels/distill.py"]
               if f not in names]
    assert not missing, missing


def test_without_a_compiler_the_package_still_installs_and_works(tmp_path):
    """No C++ compiler at build time: a wheel without _C that installs, imports, says once why
    the cpu backend is unavailable, and computes the loss with the torch backend."""
    src = copy_tree(str(tmp_path / "src"))
    env = dict(check_wheel.clean_env(), CXX="no-such-compiler")
    out = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                "-w", str(tmp_path / "dist"), src], env, src, stderr=True)
    assert "no C++ compiler ('no-such-compiler' not found; set CXX)" in out
    (wheel,) = (tmp_path / "dist").glob("fastdistill-*.whl")
    assert not any(n.startswith("fastdistill/_C") for n in zipfile.ZipFile(wheel).namelist())
    py = check_wheel.venv_beside_torch(str(tmp_path / "venv"))
    check_wheel.pip_install(py, str(wheel))
    script = (
        "import warnings, torch, fastdistill as fd\n"
        "ok, why = fd.backends.check('cpu', torch.device('cpu'))\n"
        "assert not ok and 'fastdistill._C is not available' in why, why\n"
        "s = torch.randn(3, 20, requires_grad=True); t = torch.randn(3, 20)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    fd.distill_loss(s, t).backward(); fd.distill_loss(s, t)\n"
        "assert len([x for x in w if 'torch backend' in str(x.message)]) == 1, w\n"
        "try:\n"
        "    fd.distill_loss(s, t, backend='cpu')\n"
        "except fd.BackendUnavailableError as e:\n"
        "    assert 'reinstall with a C++ compiler' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpu backend should be unavailable')\n"
        "print('ok')\n")
    assert _run([py, "-c", script], check_wheel.clean_env(), str(tmp_path)).strip() == "ok"


def test_torch_is_the_only_requirement_and_the_venv_sees_this_torch(tmp_path):
    """The helper the wheel tests rely on: a fresh environment beside this torch imports exactly
    this torch, and nothing of this checkout."""
    py = check_wheel.venv_beside_torch(str(tmp_path / "venv"))
    out = _run([py, "-c", "import torch, importlib.util as u; print(torch.__version__, "
                "u.find_spec('fastdistill') is None)"], check_wheel.clean_env(), str(tmp_path))
    assert out.split() == [torch.__version__, "True"]
