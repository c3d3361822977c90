"""Compile every Triton kernel ahead of time for real GPU targets (no GPU needed) and report the
resource usage that cuobjdump reads from the cubins: registers, stack, local memory (spills).

Run in a process WITHOUT TRITON_INTERPRET (an interpreted kernel cannot be compiled):
    python tests/aot_compile.py [--arch 80 90] [--json out.json]
tests/test_aot.py runs it and asserts no spills.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

from fastdistill.divergences import DIVERGENCE_CODES  # noqa: E402
from fastdistill.kernels import distill, feature, scale  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups())))


def sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout


# Integer arguments that are multiples of 16 at the reference sizes (V = 128256, D = 4096): the
# JIT marks those, and 16-byte aligned pointers, as divisible by 16 at run time, which is what
# lets it emit 128-bit loads; the ahead-of-time compile gets the same hints.
DIV16 = {"s_stride", "t_stride", "g_stride", "V", "G_WIDTH", "D", "W", "h_stride", "w_stride"}


def compile_one(fn, signature, constexprs, arch, num_warps):
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(signature.items())
             if v.startswith("*") or k in DIV16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return k.asm["cubin"]


def distill_cases(dtype):
    """The logit-level kernel at the V = 128256 configuration, every divergence."""
    p = f"*{dtype}"
    block = distill.block_size(128256)
    sig = {"s_ptr": p, "s_stride": "i64", "t_ptr": p, "t_stride": "i64", "labels_ptr": "*i64",
           "g_ptr": p, "g_stride": "i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
           "V": "i32", "G_WIDTH": "i32", "ignore_index": "i64", "beta": "fp32", "inv_t": "fp32",
           "soft_scale": "fp32", "hard_weight": "fp32", "DIV": "constexpr",
           "HAS_LABELS": "constexpr", "HARD": "constexpr", "T_IS_1": "constexpr",
           "WRITE_GRAD": "constexpr", "BLOCK": "constexpr"}
    for name, code in DIVERGENCE_CODES.items():
        for t_is_1 in (True, False):
            c = {"DIV": code, "HAS_LABELS": True, "HARD": True, "T_IS_1": t_is_1,
                 "WRITE_GRAD": True, "BLOCK": block}
            yield f"distill[{name},{dtype},T1={t_is_1}]", distill.distill_kernel, sig, c, 8


def feature_cases(dtype):
    p = f"*{dtype}"
    sig = {"s_ptr": p, "s_stride": "i64", "t_ptr": p, "t_stride": "i64", "mask_ptr": "*i1",
           "g_ptr": p, "g_stride": "i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32", "D": "i32",
           "KIND": "constexpr", "HAS_MASK": "constexpr", "WRITE_GRAD": "constexpr",
           "BLOCK": "constexpr", "ONE_TILE": "constexpr"}
    for kind in range(3):
        for one_tile, block in ((True, 4096), (False, 4096)):
            c = {"KIND": kind, "HAS_MASK": True, "WRITE_GRAD": True, "BLOCK": block,
                 "ONE_TILE": one_tile}
            yield f"feature[{kind},{dtype},one_tile={one_tile}]", feature.feature_kernel, sig, c, 8


def scale_cases(dtype):
    sig = {"g_ptr": f"*{dtype}", "g_stride": "i64", "f_ptr": "*fp32", "W": "i32",
           "PER_ROW": "constexpr", "BLOCK": "constexpr"}
    yield f"scale_rows[{dtype}]", scale.scale_rows_kernel, sig, {"PER_ROW": False, "BLOCK": 2048}, 4


def all_cases():
    for dtype in ("bf16", "fp32"):
        yield from distill_cases(dtype)
        yield from feature_cases(dtype)
        yield from scale_cases(dtype)
    extra = getattr(sys.modules.get("fastdistill.kernels.linear"), "AOT_CASES", None)
    if extra:
        yield from extra()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json")
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    try:
        import fastdistill.kernels.linear  # noqa: F401  (its fused kernels, when present)
    except ImportError:
        pass
    results = []
    for name, fn, sig, consts, warps in all_cases():
        if args.filter not in name:
            continue
        for arch in args.arch:
            cubin = compile_one(fn, sig, consts, arch, warps)
            ru = resource_usage(cubin)
            code = sass(cubin)
            ru.update(name=name, arch=arch,
                      hmma=("HMMA" in code), hgmma=("HGMMA" in code),
                      ldg128=bool(re.search(r"LDG\.E\.(128|ENL2\.256)", code)))
            results.append(ru)
            print(f"sm_{arch} {name:48s} reg={ru['reg']:3d} stack={ru['stack']} "
                  f"local={ru['local']} ldg128={ru['ldg128']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
