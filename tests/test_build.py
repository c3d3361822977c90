"""The compiled extension: present, torch-free, version, ISA dispatch; and a wheel that installs
into a fresh virtual environment next to torch and computes a loss and its gradient."""

import os
import subprocess
import sys
import sysconfig

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        assert not any(x in lib for x in ("torch", "c10", "python", "cudart.so")), needed


def _wheel(tmp_path, env=None, src=ROOT):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(dist), str(src)], check=True, cwd=str(src),
                   env=dict(os.environ, **(env or {})))
    wheels = list(dist.glob("fastdistill-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile
    return wheels[0], zipfile.ZipFile(wheels[0]).namelist()


def _venv_next_to_torch(tmp_path, wheel):
    """A fresh virtual environment that sees this environment's torch and nothing else of it,
    with `wheel` installed; returns its python."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    # "next to torch": the fresh environment sees the torch of this one, nothing else of it
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "torch_only.pth"), "w") as f:
        f.write(torch_site + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", str(wheel)], check=True)
    return env_dir, py


def _run_in(py, script, cwd):
    return subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=cwd,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("PYTHONPATH", "TRITON_INTERPRET")})


def test_wheel_installs_next_to_torch(tmp_path):
    wheel, names = _wheel(tmp_path)
    assert any(n.startswith("fastdistill/_C") and n.endswith(".so") for n in names), names
    assert "fastdistill/kernels/distill.py" in names
    env_dir, py = _venv_next_to_torch(tmp_path, wheel)
    script = (
        "import torch, fastdistill as fd\n"
        "from fastdistill.backends import _ext\n"
        "assert _ext._C is not None, _ext.LOAD_ERROR\n"
        "assert fd.__file__.startswith(%r), fd.__file__\n"
        "s = torch.randn(4, 50, requires_grad=True); t = torch.randn(4, 50)\n"
        "loss = fd.distill_loss(s, t, divergence='jsd', backend='cpu'); loss.backward()\n"
        "assert torch.isfinite(loss) and s.grad.abs().sum() > 0\n"
        "print('ok', fd.__version__)\n" % str(env_dir))
    out = _run_in(py, script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok " + fd.__version__)


def test_without_a_compiler_the_package_still_installs_and_works(tmp_path):
    """No C++ compiler at build time: a wheel without _C that installs, imports, says once why
    the cpu backend is unavailable, and computes the loss with the torch backend."""
    # from a copy of the sources without build outputs (an in-place _C or a build/ folder left
    # by an earlier build would end up in the wheel)
    import shutil
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.so", "*.o", "__pycache__", "*.egg-info", "demo_out",
        "out", ".pytest_cache", ".benchmarks"))
    wheel, names = _wheel(tmp_path, env={"CXX": "no-such-compiler"}, src=src)
    assert not any(n.startswith("fastdistill/_C") for n in names), names
    _, py = _venv_next_to_torch(tmp_path, wheel)
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
    out = _run_in(py, script, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
