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

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

from fastdistill.divergences import DIVERGENCE_CODES  # noqa: E402
from fastdistill.kernels import distill, feature, linear, scale  # noqa: E402

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
DIV16 = {"s_stride", "t_stride", "g_stride", "V", "G_WIDTH", "D", "W", "Ds", "Dt", "hs_stride",
         "ws_stride", "ht_stride", "wt_stride", "tlog_stride", "cols_per_split", "c0",
         "c_width"}


def compile_one(fn, signature, constexprs, arch, options):
    """options: num_warps, or the launch-option dict the launcher passes."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(signature.items())
             if v.startswith("*") or k in DIV16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    if isinstance(options, int):
        options = {"num_warps": options}
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return k.asm["cubin"]


def distill_cases(dtype):
    """The logit-level kernel at the V = 128256 configuration, every divergence."""
    p = f"*{dtype}"
    block = distill.block_size(128256)
    sig = {"s_ptr": p, "s_stride": "i64", "t_ptr": p, "t_stride": "i64", "labels_ptr": "*i64",
           "g_ptr": p, "g_stride": "i64", "loss_ptr": "*fp32", "scale_ptr": "*fp32",
           "V": "i32", "G_WIDTH": "i32", "ignore_index": "i64", "beta": "fp32", "s_mul": "fp32",
           "t_mul": "fp32", "h_mul": "fp32", "soft_scale": "fp32", "hard_weight": "fp32",
           "DIV": "constexpr", "HAS_LABELS": "constexpr", "HARD": "constexpr",
           "SAME_LSE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK": "constexpr"}
    for name, code in DIVERGENCE_CODES.items():
        for same in (True, False):
            c = {"DIV": code, "HAS_LABELS": True, "HARD": True, "SAME_LSE": same,
                 "WRITE_GRAD": True, "BLOCK": block}
            yield (f"distill[{name},{dtype},T1={same}]", distill.distill_kernel, sig, c,
                   distill.launch_options(block))


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


def linear_cases(dtype):
    """The fused linear kernels with 16-bit inputs at their GPU tile sizes (D = 4096)."""
    p = f"*{dtype}"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tiles = [("hs_ptr", p), ("ws_ptr", p), ("bs_ptr", p), ("ht_ptr", p), ("wt_ptr", p),
             ("bt_ptr", p), ("tlog_ptr", p), ("labels_ptr", "*i64")]
    def flags(kernel):
        BM, BN, BK, warps = linear._tiles(torch_dtype, kernel)
        return {"HAS_LABELS": True, "HARD": True, "SAME_LSE": False, "HAS_SB": False,
                "HAS_TB": False, "DENSE_T": False, "S_CAP": True, "T_CAP": False,
                "PRECISION": linear._precision(torch_dtype), "BLOCK_M": BM, "BLOCK_N": BN,
                "BLOCK_K": BK}, linear._launch_options(warps)
    dims = [("N", "i32"), ("V", "i32"), ("Ds", "i32"), ("Dt", "i32"), ("hs_stride", "i64"),
            ("ws_stride", "i64"), ("ht_stride", "i64"), ("wt_stride", "i64"),
            ("tlog_stride", "i64")]
    sig = dict(tiles + [("stats_ptr", "*fp32"), ("part_ptr", "*fp32")] + dims +
               [("cols_per_split", "i32"), ("n_splits", "i32"), ("inv_t", "fp32"),
                ("s_scale", "fp32"), ("t_scale", "fp32"), ("s_cap", "fp32"), ("t_cap", "fp32"),
                ("beta", "fp32")] +
               [(k, "constexpr") for k in ["DIV", "PASS"] + list(flags("stats")[0])])
    fl, warps = flags("stats")
    for name, code in (("forward_kl", 0), ("reverse_kl", 1), ("jsd", 2), ("tvd", 5),
                       ("symmetric_kl", 6)):
        for pas in ((1, 2) if 2 <= code <= 5 else (1,)):
            yield (f"linear_stats[{name},pass{pas},{dtype}]", linear.linear_stats_kernel, sig,
                   dict(fl, DIV=code, PASS=pas), warps)
    sig = dict(tiles + [("stats_ptr", "*fp32"), ("rowf_ptr", "*fp32"), ("g_ptr", p),
                        ("g_stride", "i64"), ("c0", "i32"), ("c_width", "i32")] + dims +
               [("inv_t", "fp32"), ("s_scale", "fp32"), ("t_scale", "fp32"), ("s_cap", "fp32"),
                ("t_cap", "fp32"), ("beta", "fp32"), ("soft_scale", "fp32"),
                ("hard_weight", "fp32")] +
               [(k, "constexpr") for k in ["DIV"] + list(flags("grad")[0])])
    fl, warps = flags("grad")
    for name, code in (("forward_kl", 0), ("reverse_kl", 1), ("jsd", 2), ("tvd", 5),
                       ("symmetric_kl", 6)):
        yield (f"linear_grad[{name},{dtype}]", linear.linear_grad_kernel, sig,
               dict(fl, DIV=code), warps)
    sig = {"part_ptr": "*fp32", "stats_ptr": "*fp32", "div_ptr": "*fp32", "N": "i32",
           "n_splits": "i32", "beta": "fp32", "DIV": "constexpr", "PASS": "constexpr",
           "BLOCK_M": "constexpr"}
    yield f"linear_finish[{dtype}]", linear.linear_finish_kernel, sig, \
        {"DIV": 0, "PASS": 1, "BLOCK_M": 64}, 4


def all_cases():
    for dtype in ("bf16", "fp32"):
        yield from distill_cases(dtype)
        yield from feature_cases(dtype)
        yield from scale_cases(dtype)
    yield from linear_cases("bf16")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json")
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
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
                      # 128-bit global loads, direct or asynchronous (cp.async into shared)
                      ldg128=bool(re.search(r"LDG(STS)?\.E\.[\w.]*128", code)))
            results.append(ru)
            print(f"sm_{arch} {name:48s} reg={ru['reg']:3d} stack={ru['stack']} "
                  f"local={ru['local']} ldg128={ru['ldg128']} hmma={ru['hmma']} "
                  f"hgmma={ru['hgmma']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
