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


def test_wheel_installs_next_to_torch(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(dist), ROOT], check=True, cwd=ROOT)
    wheels = list(dist.glob("fastdistill-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("fastdistill/_C") and n.endswith(".so") for n in names), names
    assert "fastdistill/kernels/distill.py" in names

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
                    "--no-deps", str(wheels[0])], check=True)
    script = (
        "import torch, fastdistill as fd\n"
        "from fastdistill.backends import _ext\n"
        "assert _ext._C is not None, _ext.LOAD_ERROR\n"
        "assert fd.__file__.startswith(%r), fd.__file__\n"
        "s = torch.randn(4, 50, requires_grad=True); t = torch.randn(4, 50)\n"
        "loss = fd.distill_loss(s, t, divergence='jsd', backend='cpu'); loss.backward()\n"
        "assert torch.isfinite(loss) and s.grad.abs().sum() > 0\n"
        "print('ok', fd.__version__)\n" % str(env_dir))
    out = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok " + fd.__version__)
