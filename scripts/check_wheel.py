#!/usr/bin/env python3
"""Installs a fastdistill wheel into a fresh virtual environment and runs scripts/smoke_wheel.py
there (forward and backward on the cpu and torch backends, `python -m fastdistill.info`).

    python scripts/check_wheel.py WHEEL                      # beside this interpreter's torch
    python scripts/check_wheel.py WHEEL --torch torch==2.14.1 [--keep DIR]

Beside torch (the default, seconds): the new environment sees the site-packages folder that holds
this interpreter's torch through a .pth line, and gets the wheel itself with --no-deps.
--torch SPEC: the new environment installs SPEC with pip from the configured index (a CUDA build
of torch is several GB) and then the wheel; --keep keeps that environment in DIR.
"""

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def clean_env():
    """os.environ without what would make a fresh environment see something else."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV", "PYTHONHOME")}


def venv_beside_torch(env_dir):
    """A fresh virtual environment in env_dir that sees this interpreter's torch (and the rest of
    the site-packages holding it, but no .pth file of it, so no editable install); its python."""
    import torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    py = os.path.join(env_dir, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "torch_beside.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))) + "\n")
    return py


def venv_with(env_dir, spec):
    """A fresh virtual environment in env_dir with `spec` installed by its own pip; its python."""
    subprocess.run([sys.executable, "-m", "venv", env_dir], check=True)
    py = os.path.join(env_dir, "bin", "python")
    subprocess.run([py, "-m", "pip", "install", "-q", spec], check=True, env=clean_env())
    return py


def pip_install(py, *args):
    """pip (this interpreter's) installing into the environment of `py`, no dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
                    *args], check=True, env=clean_env())


def smoke(py, cwd):
    """Runs smoke_wheel.py with `py` from `cwd` (outside any source tree); its output."""
    out = subprocess.run([py, os.path.join(HERE, "smoke_wheel.py")], capture_output=True,
                         text=True, cwd=cwd, env=clean_env())
    if out.returncode != 0:
        raise RuntimeError(f"smoke_wheel.py failed in {py}:\n{out.stdout}{out.stderr}")
    return out.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--torch", help="install this torch (e.g. torch==2.14.1) into the new "
                                    "environment instead of seeing this interpreter's")
    ap.add_argument("--keep", help="folder for the environment, kept afterwards (and reused "
                                   "when it exists: only the wheel is reinstalled)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = args.keep or os.path.join(tmp, "venv")
        py = os.path.join(env_dir, "bin", "python")
        if not os.path.exists(py):
            py = venv_with(env_dir, args.torch) if args.torch else venv_beside_torch(env_dir)
        pip_install(py, "--force-reinstall", os.path.abspath(args.wheel))
        print(smoke(py, tmp).strip())


if __name__ == "__main__":
    main()
