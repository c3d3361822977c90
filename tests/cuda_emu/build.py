"""Builds the CUDA sources of csrc/cuda/ as host code against tests/cuda_emu/include/emu.h and
loads the result with ctypes.

The only rewrite of the sources is the launch syntax: ``kernel<<<grid, block, shmem,
stream>>>(args);`` becomes ``emu_launch(grid, block, shmem, stream, [&] { kernel(args); });``.
Everything else (the kernels, the launchers with their argument checks and block sizes, the
shared headers) compiles as written. The library is cached under build/cuda_emu/ by a hash of
its inputs.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LAUNCH = re.compile(r"(\w+(?:<[^;{}<>]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)


def _inputs():
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*")))
    files += sorted(glob.glob(os.path.join(ROOT, "csrc", "include", "fastdistill", "*.h")))
    files += sorted(glob.glob(os.path.join(HERE, "include", "*.h")))
    files += [os.path.join(HERE, "api.cpp"), os.path.abspath(__file__)]
    return files


def rewrite(src: str) -> str:
    out, n = LAUNCH.subn(lambda m: f"emu_launch({m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});",
                         src)
    return out


def compiler():
    cxx = os.environ.get("CXX", "c++")
    return cxx if shutil.which(cxx) else None


def build() -> str:
    """Path of the emulation library (built if needed)."""
    h = hashlib.sha256()
    for f in _inputs():
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    out_dir = os.path.join(ROOT, "build", "cuda_emu", h.hexdigest()[:16])
    lib = os.path.join(out_dir, "libfd_cuda_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    sources = [os.path.join(HERE, "api.cpp")]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with open(cu) as f:
            text = f.read()
        dst = os.path.join(out_dir, os.path.basename(cu)[:-3] + ".cpp")
        with open(dst, "w") as f:
            f.write(f'#line 1 "{cu}"\n' + rewrite(text))
        sources.append(dst)
    tmp = lib + ".tmp"
    cmd = [compiler(), "-O1", "-std=c++20", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
           "-fno-math-errno", "-w", "-I" + os.path.join(HERE, "include"),
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc"),
           *sources, "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{res.stderr[-6000:]}")
    os.replace(tmp, lib)
    return lib


def load() -> ctypes.CDLL:
    lib = ctypes.CDLL(build())
    for fn in (lib.emu_distill, lib.emu_feature, lib.emu_scale, lib.emu_topk):
        fn.argtypes = [ctypes.c_void_p]  # the address of an argument struct (args.h)
        fn.restype = ctypes.c_int32
    lib.emu_last_error.restype = ctypes.c_char_p
    lib.emu_sizeof.argtypes = [ctypes.c_int32]
    lib.emu_sizeof.restype = ctypes.c_int64
    return lib
