"""Static performance model: H200 time of every kernel and benchmark preset, read from the
compiled code, with no GPU.

    python -m fastdistill.bench.roofline [--csv PATH] [--arch 90] [--show-loop KERNEL]
                                         [--calibrate results.csv ...] [--jobs N]

It compiles every Triton kernel for the target (fastdistill.bench.aot: the specs come from the
launchers themselves) and reads the CUDA kernels of the built extension, parses their SASS
(fastdistill.bench.sass: basic blocks, loops from the backward branches, the steady-state path
of each loop), and for each kernel x divergence x dtype reports

- instructions per element of every streaming loop: the loop body's instructions on its
  steady-state path divided by the elements one thread handles per iteration (Triton: the tile
  constexprs / threads; CUDA: the bytes the path loads / the bytes an element needs; the two
  agree for the Triton kernels, which tests/test_roofline.py checks), summed over the passes;
- MUFU operations per element (MUFU.EX2, LG2, RCP, RSQ, ...), barriers (BAR) and shuffles (SHFL)
  per tile, the widest global load (LDG.E.128, cp.async LDGSTS, TMA UTMALDG), registers, spills,
  CTAs and warps per SM (occupancy from registers, threads and shared memory);
- HBM bytes by construction (passes x bytes per element, per kernel below);
- for the GEMM kernels (fused linear, mm_kernel) the warpgroup MMA shape (e.g. HGMMA.64x32x16)
  and the instructions per K step.

Predicted time of a kernel = max(memory bound, issue bound, MUFU bound[, GEMM bound]):

- memory: HBM bytes / 4.3 TB/s, the copy bandwidth of an H200 (about 90% of the 4.8 TB/s of the
  datasheet; a device-to-device copy on H100-class HBM reaches about 93% of its peak). A
  re-read of a row (the later passes) counts as HBM traffic when the rows the resident programs
  stream do not fit in the 50 MB L2 together, as L2 traffic (free) otherwise;
- issue: warp instructions / (132 SMs x 4 schedulers x 1 instruction per clock x 1.83 GHz).
  1.83 GHz is the clock at which NVIDIA's dense tensor peak of the H100/H200 SXM (989.4 TFLOP/s
  = 132 SMs x 4096 FLOP/clk x 1.83 GHz) is stated;
- MUFU: MUFU operations / (16 per clock per SM x 132 SMs x 1.83 GHz); 16 results per clock per
  SM for exp2 / log2 / reciprocal / rsqrt is the rate of compute capability 8.x and 9.0 in the
  CUDA C++ Programming Guide (arithmetic instruction throughput table);
- GEMM (linear, both modes): FLOPs / 790 TFLOP/s, the rate cuBLAS reaches on large bf16 GEMMs of an
  H100/H200 SXM (about 80% of the 989.4 TFLOP/s dense peak), also the rate of the GEMM floor.

Floors: logit level and features, one read of every input and one write of the gradient at the
copy bandwidth; linear (both modes), 2 N V (3 Ds + Dt) FLOPs (the forward's two GEMMs and the
backward's two, no recompute) at 790 TFLOP/s. ratio = predicted / floor.

HBM bytes by construction (E = bytes per element, V columns, N rows):
  distill_kernel   N V (passes (E_s + E_t) + E_s): passes 2 (forward / reverse KL), 3 (jsd, skew,
                   tvd); 1 when the resident rows fit in L2 (they do not at V >= 50k)
  feature_kernel   rows D (E_s + E_t + E_s) (one tile in registers); wider rows stream 2 or 3
                   passes, the later ones from L2 when the resident rows fit
  scale_rows       N W 2 E (read and write; nothing when the factor is 1)
  linear_stats     (fused) the hidden rows and the weights of its tiles. Program p handles
                   row block p // splits, split p % splits: the resident programs cover
                   resident / splits row blocks x every split; their hidden rows stay in L2 for
                   the sweep when they fit in half of it (else re-read per tile), and each such
                   wave of row blocks streams every weight tile once
  linear_grad      (fused) tiles in groups of GROUP_M row blocks: the group's hidden rows once per
                   vocabulary chunk (from L2 across its columns), the weights once per group;
                   plus the [N, chunk] gradient written
  mm_kernel        the Triton GEMM with an accumulating epilogue (grad_hidden of the fused mode,
                   grad_weight of the chunked mode): A and B once, and per element of C 4 bytes
                   (two 16-bit planes written), 8 (read and written) or 6 (read, rounded to
                   bf16 and written); bounds concurrent with two or more CTAs per SM (one CTA's
                   epilogue overlaps another's K-loop), the epilogue added to the K-loop with one
  cuBLAS           GEMMs at 790 TFLOP/s; their HBM bytes (the float32 logits written, the weights
                   re-read per chunk or ring, the staged gradient read) as a memory bound

The linear modes (gpu-linear preset, forward + backward), against the GEMM floor 2 N V (3 Ds +
Dt) at 790 TFLOP/s (the "gemm floor (4 GEMMs)" row):
  chunked  per chunk (fastdistill._chunked.plan_chunks) the student and teacher logits by cuBLAS
           in float32, the logit-level kernel over them (float32 in, the bf16 gradient out),
           per ring of rows grad_hidden by cuBLAS and grad_weight by mm_kernel (two 16-bit
           planes; one cuBLAS GEMM when a single ring holds every row)
  fused    the statistics sweep (two for jsd, skew, tvd), the merge, the gradient tiles
           recomputed, per vocabulary chunk grad_weight by cuBLAS (complete, bf16) and
           grad_hidden by mm_kernel; 6 GEMM units of 2 N V D against the floor's 4 (1.5x) by
           construction, 8 (2x) with the second sweep
Each total row carries the extra memory of its mode by construction (extra_bytes).

What it ignores: launch overheads and tails (partial waves), instruction latencies and
dependency stalls (the issue bound assumes a ready warp on every scheduler every clock; the
report gives the resident warps per scheduler, fewer than ~4 makes it optimistic), the latency
of loads that are not prefetched (bytes in flight per SM are reported; Little's law needs about
4.3 TB/s x ~0.6 us / 132 = ~20 KB per SM), dual issue, shared-memory bank conflicts, L2
bandwidth, the tensor-core rate of Triton's own wgmma tiles (taken as cuBLAS's), and overlap
between kernels. The CUDA kernels' run-time branches (teacher dtype, feature kind) are not
correlated by the path search (see fastdistill.bench.sass). A GPU run calibrates it:
``--calibrate results.csv`` (the bench CSVs) prints measured / predicted per kernel family.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastdistill.bench import sass as S

# ---- the machines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    name: str
    arch: int
    sms: int
    clock_hz: float
    hbm_bytes_s: float          # achievable copy bandwidth
    gemm_flops_s: float         # achievable dense bf16 GEMM rate (cuBLAS)
    l2_bytes: int
    smem_per_sm: int
    schedulers: int = 4
    mufu_per_clk_sm: int = 16   # CUDA C++ Programming Guide, arithmetic instruction throughput
    regs_per_sm: int = 65536
    max_threads_sm: int = 2048
    max_ctas_sm: int = 32

    @property
    def issue_per_s(self) -> float:
        return self.sms * self.schedulers * self.clock_hz

    @property
    def mufu_per_s(self) -> float:
        return self.sms * self.mufu_per_clk_sm * self.clock_hz


H200 = Machine("H200 SXM", 90, sms=132, clock_hz=1.83e9, hbm_bytes_s=4.3e12,
               gemm_flops_s=790e12, l2_bytes=50 << 20, smem_per_sm=228 << 10)
# A100 SXM 80 GB: 108 SMs, 1.41 GHz, 2.04 TB/s HBM2e (about 85% on a copy), 312 TFLOP/s dense
# bf16 (80% of it for cuBLAS), 40 MB L2, 164 KB shared memory per SM
A100 = Machine("A100 SXM", 80, sms=108, clock_hz=1.41e9, hbm_bytes_s=1.73e12,
               gemm_flops_s=250e12, l2_bytes=40 << 20, smem_per_sm=164 << 10)
MACHINES = {90: H200, 80: A100}

# ---- the presets (fastdistill/bench/__main__.py) -----------------------------------------------

N_TOKENS = 8192
LOGIT_VOCABS = (50257, 128256, 151936, 256000)   # GPT-2, Llama-3, Qwen2, Gemma
LINEAR_V, LINEAR_D = 128256, 4096
FEATURE_D, FEATURE_PAIRS = 4096, 4
TWO_PASS = ("forward_kl", "reverse_kl", "symmetric_kl")
LINEAR_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "symmetric_kl")
GEMM_FLOOR = "gemm floor (4 GEMMs)"
ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPES = ("bf16", "fp32")

# ---- per-kernel analysis ----------------------------------------------------------------------


@dataclass
class LoopInfo:
    start: int
    end: int
    instr: int                 # on the steady-state path, nested loops excluded
    instr_static: int          # every instruction of the body, nested loops excluded
    mufu: Dict[str, int]
    barriers: int
    shuffles: int
    load_bits: int
    store_bits: int
    widest_load: str
    mma: Dict[str, int]
    depth: int
    shared_load_bits: int = 0  # shared-memory bits loaded per thread (LDS)
    elems: float = 0.0         # elements per thread per iteration (streaming loops)
    elems_from_loads: float = 0.0
    kind: str = ""             # stream (a pass over the row), tile (over logit tiles), k (GEMM)

    @property
    def mufu_total(self) -> int:
        return sum(self.mufu.values())


@dataclass
class Analysis:
    rec: Dict[str, Any] = field(repr=False)
    name: str
    backend: str
    kernel: str
    op: str
    dtype: str
    divergence: str
    variant: str
    arch: int
    threads: int
    regs: int
    spill: int                  # local + stack bytes
    shared: int
    loops: List[LoopInfo]
    body: LoopInfo              # the path outside every loop (one per program)
    body_elems: float           # elements per thread of a loop-free program (0: has loops)
    ctas_per_sm: int = 0

    @property
    def streams(self) -> List[LoopInfo]:
        return [lp for lp in self.loops if lp.kind in ("stream", "tile")]

    @property
    def kloops(self) -> List[LoopInfo]:
        return [lp for lp in self.loops if lp.kind == "k"]

    @property
    def per_elem(self) -> List[Tuple[float, float]]:
        """(instructions, MUFU ops) per element of each streaming pass (loop-free kernels: the
        program's path)."""
        if self.streams:
            return [(lp.instr / lp.elems, lp.mufu_total / lp.elems) for lp in self.streams]
        if self.body_elems:
            return [(self.body.instr / self.body_elems, self.body.mufu_total / self.body_elems)]
        return []

    @property
    def instr_per_elem(self) -> float:
        return sum(i for i, _ in self.per_elem)

    @property
    def mufu_per_elem(self) -> float:
        return sum(m for _, m in self.per_elem)

    @property
    def main(self) -> LoopInfo:
        """The streaming loop with the most instructions (or the loop-free body)."""
        return max(self.streams, key=lambda lp: lp.instr) if self.streams else self.body

    @property
    def mma_shape(self) -> str:
        shapes = set()
        for lp in self.kloops:
            shapes |= set(lp.mma)
        return " ".join(sorted(shapes))

    @property
    def load_width(self) -> str:
        """The widest global load of the streaming paths (K-loops included)."""
        ops = [lp.widest_load for lp in self.streams + self.kloops + [self.body]
               if lp.widest_load]
        return max(ops, key=lambda op: S.global_load_width(S.Instr(0, op, None, op)),
                   default="")

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * math.ceil(self.threads / 32)


def _info(cfg: S.CFG, loop: Optional[S.Loop], depth: int, must_mufu: bool = False) -> LoopInfo:
    path = cfg.steady_path(loop, must_mufu)
    inner = cfg.inner_blocks(loop)
    c = S.count(cfg.path_instrs(path, inner))
    blocks = loop.body if loop is not None else range(len(cfg.blocks))
    static = sum(len(cfg.block_instrs(b)) for b in blocks if b not in inner)
    start, end = cfg.loop_range(loop) if loop is not None else (0, cfg.ins[-1].addr)
    return LoopInfo(start, end, c.instr, static, c.mufu, c.barriers, c.shuffles, c.load_bits,
                    c.store_bits, c.widest_load, c.mma, depth, shared_load_bits=c.shared_load_bits)


# kernels of sparse (top-k) teachers: their passes over the vocabulary read 128 bits at a time
# (the student's tiles, or the logits for the extraction); their other loops run over the K
# indices of a row or over the rows of a persistent program
SPARSE_OPS = ("topk", "extract")


def stream_bytes_per_elem(op: str, dtype: str) -> int:
    """Bytes a streaming pass reads per element, by construction: the student and the teacher
    (logits or features, same dtype in the presets); the scale kernel reads the gradient, the
    sparse-teacher kernels the student (or the logits) only."""
    e = ESIZE[dtype]
    return e if op in ("scale",) + SPARSE_OPS else 2 * e


def _tile(rec) -> int:
    """Elements of one tile of a Triton kernel (its tile constexprs)."""
    c = rec.get("constexprs", {})
    if "BLOCK_M" in c and "BLOCK_N" in c:
        return c["BLOCK_M"] * c["BLOCK_N"]
    if "NT" in c and "TB" in c:  # the row kernel: NT tiles over a cluster of num_ctas CTAs
        return c["NT"] * c["TB"] // rec.get("num_ctas", 1)
    return c.get("BLOCK", 0)


def _occupancy(m: Machine, regs: int, threads: int, shared: int) -> int:
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256      # allocated in units of 256
    by_regs = m.regs_per_sm // (per_warp * warps)
    by_threads = m.max_threads_sm // (warps * 32)
    by_smem = (m.smem_per_sm // (shared + 1024)) if shared else m.max_ctas_sm
    return max(0, min(by_regs, by_threads, by_smem, m.max_ctas_sm))


def analyse(rec: Dict[str, Any], m: Machine = H200, threads: Optional[int] = None) -> Analysis:
    """The loops, counts and occupancy of one compiled kernel (an aot record)."""
    cfg = S.CFG(rec["sass"])
    infos = []
    for lp in cfg.loops:
        depth, p = 0, lp.parent
        while p is not None:
            depth, p = depth + 1, cfg.loops[p].parent
        infos.append((lp, _info(cfg, lp, depth)))
    # the row kernel is loop-free: its steady path is the one through its exponentials (not a
    # row that is ignored, whose label load may be as wide as its tile loads)
    body = _info(cfg, None, 0, must_mufu=rec.get("kernel") == "distill_row_kernel")
    op, dtype = rec["op"], rec["dtype"]
    threads = threads or rec.get("threads") or 32 * rec.get("num_warps", 4)
    loops = []
    per_elem = stream_bytes_per_elem(op, dtype)
    resident = rec["backend"] == "cuda" and op == "distill"
    for lp, info in infos:
        if info.mma:
            info.kind = "k"
        elif lp.children and any(infos[k][1].mma for k in lp.children):
            info.kind = "tile"
        elif resident:
            info.kind = _cuda_distill_kind(info)
        elif info.load_bits and op != "linear":
            info.kind = "stream"
            if op in SPARSE_OPS and S.global_load_width(
                    S.Instr(0, info.widest_load, None, info.widest_load)) < 128:
                info.kind = "other"  # a loop over the K indices (gathers) or over rows
        else:
            info.kind = "other"          # zero-fill of ignored rows, split merges, ...
        if info.kind == "stream" and resident:
            # elements of the row one trip handles: a gradient pass by its stores (E bytes per
            # element), the others by the student and teacher bytes they read, from global or
            # shared memory
            e = ESIZE[dtype]
            info.elems_from_loads = info.store_bits / 8 / e if info.store_bits else \
                (info.shared_load_bits or info.load_bits) / 8 / per_elem
        elif info.kind == "stream":
            info.elems_from_loads = info.load_bits / 8 / per_elem
        if info.kind in ("stream", "tile"):
            tile = _tile(rec)
            info.elems = tile / threads if tile and rec["backend"] == "triton" \
                else info.elems_from_loads
        loops.append(info)
    body_elems = 0.0
    if op in SPARSE_OPS and not any(lp.kind == "stream" for lp in loops):
        pass  # no pass over the vocabulary (renormalize without a hard loss): nothing per element
    elif not any(lp.kind in ("stream", "tile") for lp in loops):
        tile = _tile(rec)
        if rec["backend"] == "triton" and tile:
            body_elems = tile / threads
        elif body.load_bits:
            body_elems = (body.load_bits - _scalar_bits(cfg)) / 8 / per_elem
        body.elems_from_loads = body.load_bits / 8 / per_elem if op != "linear" else 0.0
    a = Analysis(rec, rec["name"], rec["backend"], rec["kernel"], op, dtype, rec["divergence"],
                 rec.get("variant", ""), rec["arch"], threads, rec["reg"],
                 rec["local"] + rec["stack"], rec.get("shared", 0), loops, body, body_elems)
    a.ctas_per_sm = _occupancy(m, a.regs, threads, a.shared)
    return a


def _cuda_distill_kind(info: LoopInfo) -> str:
    """The passes of the CUDA distill kernels (csrc/cuda/distill_cuda.cu): loops that compute
    exponentials on the row read from global memory (the stream kernel's passes) or from shared
    memory (the resident kernel's statistics, which also keep its copies into shared memory in
    flight, loss and gradient passes). Not passes: loops with a block barrier on their path (the
    in-place realignment of an unaligned row, one round of units per barrier: the aligned path
    has none), and loops that only move bytes (zero fills, the copies of an unaligned row into
    shared memory, the aligned stores of an unaligned gradient row)."""
    if info.barriers or not info.mufu:
        return "other"
    return "stream" if info.load_bits or info.shared_load_bits else "other"


def _scalar_bits(cfg: S.CFG) -> int:
    """Bits of the narrower loads on the loop-free path (a factor, a mask byte): not elements."""
    path = cfg.steady_path(None)
    xs = cfg.path_instrs(path, cfg.inner_blocks(None))
    widest = max((S.global_load_width(x) for x in xs), default=0)
    return sum(w for w in (S.global_load_width(x) for x in xs) if 0 < w < widest)


# ---- CUDA kernels: names, launch configurations ------------------------------------------------

_DT = {0: "fp32", 1: "fp16", 2: "bf16"}


def cuda_records(arch: int) -> List[Dict[str, Any]]:
    """The extension's kernels for `arch`, labelled like the Triton records. The template
    arguments name the variant: distill_kernel<student dtype, divergence>, feature_kernel<dtype,
    row in registers>, scale_rows_kernel<dtype>; threads per block are the kernels'
    __launch_bounds__ (EIATTR_MAX_THREADS), except the feature kernel with the row in registers,
    whose launcher sizes the block to the row (D / elements per thread)."""
    from fastdistill.bench import aot
    from fastdistill.divergences import DIVERGENCE_CODES
    names = {v: k for k, v in DIVERGENCE_CODES.items()}
    out = []
    for r in aot.extension_kernels():
        if r["arch"] != arch:
            continue
        f = r["name"]
        # the resident kernel (the default) and the stream kernel (fallback), by their
        # length-prefixed mangled names
        m = re.search(r"(14distill_kernel|21distill_stream_kernel)ILi(\d)ELi(\d)E", f)
        if m:
            rec = dict(r, kernel="distill_kernel", op="distill", dtype=_DT[int(m.group(2))],
                       divergence=names[int(m.group(3))],
                       variant="bench" if m.group(1) == "14distill_kernel" else "stream")
        elif re.search(r"feature_kernelILi(\d)ELb([01])E", f):
            m = re.search(r"feature_kernelILi(\d)ELb([01])E", f)
            rec = dict(r, kernel="feature_kernel", op="feature", dtype=_DT[int(m.group(1))],
                       divergence="mse", variant="onetile" if m.group(2) == "1" else "tiled")
        elif re.search(r"topk_kernelILi(\d)E", f):
            m = re.search(r"topk_kernelILi(\d)E", f)
            rec = dict(r, kernel="topk_kernel", op="topk", dtype=_DT[int(m.group(1))],
                       divergence="-", variant="bench")
        elif re.search(r"scale_rows_kernelILi(\d)E", f):
            m = re.search(r"scale_rows_kernelILi(\d)E", f)
            rec = dict(r, kernel="scale_rows_kernel", op="scale", dtype=_DT[int(m.group(1))],
                       divergence="-", variant="bench")
        else:
            continue
        rec["name"] = f"cuda:{rec['kernel']}[{rec['divergence']},{rec['dtype']},{rec['variant']}]"
        rec["mangled"] = f
        rec["threads"] = r.get("max_threads") or 256
        out.append(rec)
    return out


# ---- time of a preset -------------------------------------------------------------------------


@dataclass
class Estimate:
    """Bounds of one kernel, or (with parts) of kernels run one after another."""
    mem_s: float = 0.0
    issue_s: float = 0.0
    mufu_s: float = 0.0
    gemm_s: float = 0.0
    hbm_bytes: float = 0.0
    warp_instr: float = 0.0
    mufu_ops: float = 0.0
    flops: float = 0.0
    parts: List["Estimate"] = field(default_factory=list)

    @property
    def time_s(self) -> float:
        if self.parts:
            return sum(p.time_s for p in self.parts)
        return max(self.mem_s, self.issue_s, self.mufu_s, self.gemm_s)

    @property
    def bound(self) -> str:
        if self.parts:
            return max(self.parts, key=lambda p: p.time_s).bound
        t = {"memory": self.mem_s, "issue": self.issue_s, "mufu": self.mufu_s,
             "gemm": self.gemm_s}
        return max(t, key=t.get)


def sequence(parts: Sequence[Estimate]) -> Estimate:
    """Kernels one after another: each bounded on its own, the times add."""
    e = Estimate(parts=list(parts))
    for p in parts:
        e.mem_s += p.mem_s
        e.issue_s += p.issue_s
        e.mufu_s += p.mufu_s
        e.gemm_s += p.gemm_s
        e.hbm_bytes += p.hbm_bytes
        e.warp_instr += p.warp_instr
        e.mufu_ops += p.mufu_ops
        e.flops += p.flops
    return e


def _finish(m: Machine, hbm: float, warp_instr: float, mufu: float, flops: float = 0.0):
    return Estimate(mem_s=hbm / m.hbm_bytes_s, issue_s=warp_instr / m.issue_per_s,
                    mufu_s=mufu / m.mufu_per_s, gemm_s=flops / m.gemm_flops_s, hbm_bytes=hbm,
                    warp_instr=warp_instr, mufu_ops=mufu, flops=flops)


def _rows_stream(m: Machine, a: Analysis, programs: int, width: int, passes: int,
                 e_read: int, e_write: int) -> Estimate:
    """One program per row of `width` elements; the streaming loops run ceil(width / tile)
    times. HBM: the first pass reads the row, the later ones re-read it (from L2 when the
    resident programs' rows fit), the gradient is written once."""
    warps = math.ceil(a.threads / 32)
    per_thread, mufu = a.body.instr, a.body.mufu_total
    for lp in a.streams:
        trips = math.ceil(width / (lp.elems * a.threads))
        per_thread += trips * lp.instr
        mufu += trips * lp.mufu_total
    resident = max(1, a.ctas_per_sm) * m.sms
    rereads = passes - 1 if resident * width * e_read > m.l2_bytes else 0
    hbm = programs * width * ((1 + rereads) * e_read + e_write)
    return _finish(m, hbm, programs * warps * per_thread, programs * a.threads * mufu)


def estimate_distill(m: Machine, a: Analysis, N: int, V: int,
                     stream: Optional[Analysis] = None) -> Estimate:
    """A logit-level kernel at N x V. The CUDA resident kernel (variant "bench") runs the plan
    its launcher picks (resident_plan), or the stream kernel (`stream`, its analysis) when no
    plan fits."""
    e = ESIZE[a.dtype]
    if a.backend == "cuda" and a.variant == "bench":
        plan = resident_plan(m, a.dtype, a.divergence, V)
        if plan is not None:
            return _resident(m, a, plan, N, V)
        a = stream if stream is not None else a
    if a.kernel == "distill_row_kernel":
        # a cluster of C CTAs per row, the row in registers: one loop-free program per CTA,
        # the row read once and the gradient written once
        c = a.rec.get("num_ctas", 1)
        return _rows_stream(m, a, N * c, V / c, 1, 2 * e, e)
    passes = 2 if a.divergence in TWO_PASS else 3
    return _rows_stream(m, a, N, V, passes, 2 * e, e)


# ---- the CUDA resident kernel (csrc/cuda/distill_cuda.cu: plan_resident, resident_bytes) -----
RES_HEADER_SLOTS = (16 + (32 + 1) * 8) * 4 // 16   # kHeaderSlots: exchange areas and scratch
RES_PREFERRED_BYTES = 72 << 10                     # kPreferredBytes: 3 CTAs per SM
RES_MAX_THREADS = 256                              # kResThreads
SMEM_OPTIN = {90: 227 << 10, 80: 163 << 10}        # opt-in dynamic shared memory per block
MIX_DIVERGENCES = ("jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


@dataclass(frozen=True)
class ResidentPlan:
    cluster: int        # CTAs per row
    slice_units: int    # 16-byte units of the student per CTA
    store_h: bool       # pass 2 keeps h_j in shared memory
    threads: int
    smem_bytes: int


def resident_bytes(dtype: str, divergence: str, su: int, store_h: bool) -> int:
    n = 16 // ESIZE[dtype]
    in_place = dtype == "fp32" or divergence == "tvd"
    extra = 4 * su * n if store_h and divergence in MIX_DIVERGENCES and not in_place else 0
    return 16 * (RES_HEADER_SLOTS + 2 * (su + 1)) + extra


def resident_plan(m: Machine, dtype: str, divergence: str, V: int, grad: bool = True,
                  n_rows: int = 1) -> Optional[ResidentPlan]:
    """The configuration the CUDA launcher picks for a row of V columns (the same rules as
    plan_resident in csrc/cuda/distill_cuda.cu; tests/test_cuda_paths.py holds the two equal
    through the emulated launcher): None when the stream kernel runs."""
    n = 16 // ESIZE[dtype]
    optin = SMEM_OPTIN.get(m.arch, 227 << 10)
    max_cluster = 16 if m.arch >= 90 else 1
    want_h = divergence in MIX_DIVERGENCES and grad
    tiers = [(True, RES_PREFERRED_BYTES, True), (True, optin, False),
             (False, RES_PREFERRED_BYTES, True), (False, optin, False)]
    for h, limit, smallest in tiers:
        if h and not want_h:
            continue
        sizes = [1, 2, 4, 8, 16] if smallest else [16, 8, 4, 2, 1]
        for c in sizes:
            if c > max_cluster:
                continue
            su = ((V + c - 1) // c + n - 1) // n
            b = resident_bytes(dtype, divergence, su, h)
            if b > limit or b > optin or n_rows * c > 2 ** 31 - 1:
                continue
            return ResidentPlan(c, su, h, resident_threads(su), b)
    return None


def resident_threads(su: int) -> int:
    """Threads per CTA for a slice of su units (resident_threads in distill_cuda.cu)."""
    t0 = -(-su // RES_MAX_THREADS)
    best_t, best_eff = RES_MAX_THREADS, -1.0
    for trips in range(t0, t0 + 3):
        th = max(32, (-(-su // trips) + 31) // 32 * 32)
        if th < 128 and trips > t0:
            break
        eff = su / (trips * th)
        if eff > best_eff + 1e-9:
            best_t, best_eff = th, eff
    return best_t


def _resident(m: Machine, a: Analysis, plan: ResidentPlan, N: int, V: int) -> Estimate:
    """N rows of V columns, each in `plan.cluster` CTAs of `plan.threads` threads; every pass
    loops over the thread's units (ceil(slice units / threads) trips); HBM: the row read once
    and the gradient written once, by construction (later passes read shared memory)."""
    e = ESIZE[a.dtype]
    programs = N * plan.cluster
    warps = math.ceil(plan.threads / 32)
    trips = math.ceil(plan.slice_units / plan.threads)
    per_thread = a.body.instr + trips * sum(lp.instr for lp in a.streams)
    mufu = a.body.mufu_total + trips * sum(lp.mufu_total for lp in a.streams)
    hbm = N * V * (2 * e + e)
    return _finish(m, hbm, programs * warps * per_thread, programs * plan.threads * mufu)


def size_cuda_feature_block(m: Machine, a: Analysis, D: int) -> None:
    """The CUDA feature kernel with the row in registers runs D / (elements per thread)
    threads (its launcher sizes the block to the row)."""
    if a.backend == "cuda" and a.variant == "onetile" and a.body_elems:
        a.threads = int(math.ceil(D / a.body_elems / 32) * 32)
        a.ctas_per_sm = _occupancy(m, a.regs, a.threads, a.shared)


def estimate_feature(m: Machine, a: Analysis, rows: int, D: int) -> Estimate:
    e = ESIZE[a.dtype]
    if not a.streams:  # the row in registers: the loop-free path once per program
        return _finish(m, rows * D * 3 * e, rows * math.ceil(a.threads / 32) * a.body.instr,
                       rows * a.threads * a.body.mufu_total)
    passes = 3 if a.divergence == "normalized_mse" else 2
    return _rows_stream(m, a, rows, D, passes, 2 * e, e)


def estimate_scale(m: Machine, a: Analysis, N: int, W: int) -> Estimate:
    e = ESIZE[a.dtype]
    per_program = a.body_elems * a.threads
    programs = N * math.ceil(W / per_program)
    return _finish(m, N * W * 2 * e, programs * math.ceil(a.threads / 32) * a.body.instr,
                   programs * a.threads * a.body.mufu_total)


def _kloop_instr(a: Analysis, D: Sequence[int]) -> float:
    """Instructions per warp of one tile's K-loops (one per hidden size: student, teacher)."""
    BK = a.rec["constexprs"]["BLOCK_K"]
    return sum(lp.instr * math.ceil(d / BK) for lp, d in zip(a.kloops, D))


def _gemm_tiles(m: Machine, a: Analysis, N: int, V: int, D: Tuple[int, int],
                hidden: float, weights: float) -> Estimate:
    """A fused GEMM kernel over [N, V] logit tiles of BLOCK_M x BLOCK_N with K-loops over Ds and
    Dt (student and teacher); `hidden` and `weights` are its HBM bytes for those operands."""
    c = a.rec["constexprs"]
    BM, BN = c["BLOCK_M"], c["BLOCK_N"]
    tiles = math.ceil(N / BM) * math.ceil(V / BN)
    warps = math.ceil(a.threads / 32)
    tile_epi = (a.streams[0].instr if a.streams else a.body.instr)
    per_tile = tile_epi + _kloop_instr(a, D)
    mufu_tile = (a.streams[0].mufu_total if a.streams else a.body.mufu_total)
    programs = int(math.prod(a.rec["grid"]))
    warp_instr = tiles * warps * per_tile + (programs * warps * a.body.instr if a.streams else 0)
    flops = 2.0 * N * V * sum(D[:len(a.kloops)])
    return _finish(m, hidden + weights, warp_instr, tiles * a.threads * mufu_tile, flops)


def stats_traffic(m: Machine, a: Analysis, N: int, V: int, Dsum: int, e: int,
                  splits: int) -> Tuple[float, float]:
    """HBM bytes of the hidden rows and of the weights in one statistics sweep. Program p
    handles row block p // splits and split p % splits (kernels/linear.py): the resident
    programs cover resident / splits row blocks x every split. A row block's hidden rows are
    read by its `splits` programs at the same time, from L2 for the whole sweep when the
    resident row blocks fit in half of it (else once per tile, shared by the splits); each wave
    of resident row blocks streams every weight tile once."""
    c = a.rec["constexprs"]
    BM, BN = c["BLOCK_M"], c["BLOCK_N"]
    n_rb = math.ceil(N / BM)
    resident = max(1, a.ctas_per_sm) * m.sms
    rb_conc = max(1, resident // splits)
    if rb_conc * BM * Dsum * e <= m.l2_bytes // 2:
        hidden = N * Dsum * e
    else:
        hidden = n_rb * math.ceil(V / BN) * BM * Dsum * e / splits
    weights = math.ceil(n_rb / rb_conc) * V * Dsum * e
    return hidden, weights


def grad_traffic(m: Machine, a: Analysis, N: int, V: int, Dsum: int, e: int,
                 chunks: int) -> Tuple[float, float]:
    """HBM bytes of the hidden rows and weights of the gradient kernel over all chunks: tiles
    in groups of GROUP_M row blocks (the group's hidden rows stay in L2 while it walks the
    chunk's columns, when they fit in half of it); the weights are read once per group."""
    c = a.rec["constexprs"]
    BM, BN, GM = c["BLOCK_M"], c["BLOCK_N"], c.get("GROUP_M", 1)
    n_rb = math.ceil(N / BM)
    if min(GM, n_rb) * BM * Dsum * e <= m.l2_bytes // 2:
        hidden = chunks * N * Dsum * e
        weights = math.ceil(n_rb / GM) * V * Dsum * e
    else:  # no reuse of the hidden rows across columns
        hidden = n_rb * math.ceil(V / BN) * BM * Dsum * e
        weights = math.ceil(n_rb / GM) * V * Dsum * e
    return hidden, weights


def estimate_mm(m: Machine, a: Analysis, M: int, N: int, K: int, acc_bytes: float,
                e: int = 2) -> Estimate:
    """The Triton GEMM of kernels/linear.py (mm_kernel): C [M, N] (op)= A [M, K] B [K, N].
    HBM: A and B once (grouped tile order: the group's A rows and all of B fit in L2), and
    `acc_bytes` per element of C for the epilogue (split planes: 4 written; 8 read and
    written; 4 read + 2 written on the last). With two or more CTAs per SM one CTA's epilogue
    overlaps another's K-loop and the bounds are taken as concurrent (max); with one, the
    epilogue's memory time adds to the K-loop's."""
    c = a.rec["constexprs"]
    BM, BN, BK = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    tiles = math.ceil(M / BM) * math.ceil(N / BN)
    warps = math.ceil(a.threads / 32)
    per_tile = a.body.instr + sum(lp.instr for lp in a.kloops) * (K // BK)
    flops = 2.0 * M * N * K
    hbm = (M * K + K * N) * e + M * N * acc_bytes
    est = _finish(m, hbm, tiles * warps * per_tile, 0, flops)
    if a.ctas_per_sm < 2:
        est.gemm_s += M * N * acc_bytes / m.hbm_bytes_s
    return est


def _cublas(m: Machine, flops: float, hbm: float) -> Estimate:
    """A cuBLAS GEMM: FLOPs at the GEMM rate, its HBM bytes at the copy bandwidth."""
    return _finish(m, hbm, 0, 0, flops)


def _pick(kernels: Dict[str, Analysis], kernel: str, tag: str = "") -> Optional[Analysis]:
    for a in kernels.values():
        if a.kernel == kernel and tag in a.name:
            return a
    return None


def estimate_linear(m: Machine, kernels: Dict[str, Analysis], N: int, V: int, Ds: int,
                    Dt: int) -> Tuple[Estimate, Dict[str, Estimate]]:
    """The fused mode of linear_distill_loss, forward + backward: statistics sweep(s), the
    split merge, the gradient tiles, and per vocabulary chunk the backward's two GEMMs
    (grad_weight by cuBLAS, grad_hidden by mm_kernel into two 16-bit planes)."""
    from fastdistill.backends.linear_fused import vocab_chunk
    from fastdistill.kernels.linear import split_plan
    import torch
    e = 2
    parts: Dict[str, Estimate] = {}
    cv = vocab_chunk(N, Ds, V, torch.device("meta"))
    chunks = math.ceil(V / cv)
    splits = 1
    for name, a in kernels.items():
        c = a.rec["constexprs"]
        if a.kernel == "linear_stats_kernel":
            splits = split_plan(N, V, m.sms, c["BLOCK_M"], c["BLOCK_N"])[0]
            h, w = stats_traffic(m, a, N, V, Ds + Dt, e, splits)
            parts[name] = _gemm_tiles(m, a, N, V, (Ds, Dt), h, w)
        elif a.kernel == "linear_grad_kernel":
            h, w = grad_traffic(m, a, N, V, Ds + Dt, e, chunks)
            est = _gemm_tiles(m, a, N, V, (Ds, Dt), h, w)
            g = N * V * e  # the staged gradient, written
            parts[name] = _finish(m, est.hbm_bytes + g, est.warp_instr, est.mufu_ops, est.flops)
    for name, a in kernels.items():
        if a.kernel == "linear_finish_kernel":
            programs = math.ceil(N / a.rec["constexprs"]["BLOCK_M"])
            per_thread = a.body.instr + splits * sum(lp.instr for lp in a.loops)
            parts[name] = _finish(m, N * splits * 9 * 4 + N * 8 * 4 * 2,
                                  programs * math.ceil(a.threads / 32) * per_thread, 0)
    # grad_weight per chunk: G_c^T H (cuBLAS, K = N), G read, H read per chunk, written bf16
    parts["cublas: grad_weight"] = _cublas(m, 2.0 * N * V * Ds,
                                           N * V * e + chunks * N * Ds * e + V * Ds * e)
    # grad_hidden += G_c W_c, accumulated in two 16-bit planes (mm_kernel)
    mm = {tag: _pick(kernels, "mm_kernel", tag) for tag in ("EPI=2", "EPI=3", "EPI=4")}
    if chunks > 1 and all(mm.values()):
        accs = [4.0] + [8.0] * (chunks - 2) + [6.0]
        ests = [estimate_mm(m, mm["EPI=2" if i == 0 else ("EPI=4" if i == chunks - 1
                                                            else "EPI=3")],
                            N, Ds, min(cv, V - i * cv), acc) for i, acc in enumerate(accs)]
        parts["mm_kernel: grad_hidden (split planes)"] = sequence(ests)
    else:
        parts["cublas: grad_hidden"] = _cublas(m, 2.0 * N * V * Ds, N * V * e + V * Ds * e)
    return sequence(list(parts.values())), parts


def linear_extra_bytes(mode: str, N: int, V: int, Ds: int, Dt: int, splits: int = 12) -> float:
    """Extra memory beyond inputs and gradients, by construction (bf16, N x V logits never
    held): chunked, the plan of fastdistill._chunked.plan_chunks; fused, the staged chunk, the
    low plane of grad_hidden, the statistics and split states."""
    import torch
    if mode == "chunked":
        from fastdistill._chunked import _round_up, plan_chunks
        w = torch.empty(V, Ds, dtype=torch.bfloat16, device="meta")
        h = torch.empty(N, Ds, dtype=torch.bfloat16, device="meta")
        c, ring = plan_chunks(N, V, w, h, 2)
        pitch = _round_up(V, 16)
        lo = V * Ds * 2 if ring < N else 0
        return 2 * c * V * 4 + min(ring, N) * pitch * 2 + lo + N * 4
    from fastdistill.backends.linear_fused import vocab_chunk
    cv = vocab_chunk(N, Ds, V, torch.device("meta"))
    lo = N * Ds * 2 if cv < V else 0
    return N * cv * 2 + lo + N * splits * 9 * 4 + N * 8 * 4 + N * 4 * 3


def estimate_chunked(m: Machine, kernels: Dict[str, Analysis], N: int, V: int, Ds: int,
                     Dt: int) -> Tuple[Estimate, Dict[str, Estimate]]:
    """mode="chunked" on the triton backend, forward + backward, with the chunk and ring of
    fastdistill._chunked.plan_chunks: per chunk the two logit GEMMs (cuBLAS, float32 out) and
    the logit-level kernel over the float32 logits (writing the 16-bit gradient), per ring the
    grad_hidden GEMM (cuBLAS) and the grad_weight GEMM into two 16-bit planes (mm_kernel)."""
    import torch

    from fastdistill._chunked import plan_chunks
    e = 2
    w = torch.empty(V, Ds, dtype=torch.bfloat16, device="meta")
    h = torch.empty(N, Ds, dtype=torch.bfloat16, device="meta")
    c, ring = plan_chunks(N, V, w, h, 2)
    ring = min(ring, N)
    chunks, flushes = math.ceil(N / c), math.ceil(N / ring)
    parts: Dict[str, Estimate] = {}
    # logits: both weights re-read per chunk, the float32 logits written
    parts["cublas: student + teacher logits"] = _cublas(
        m, 2.0 * N * V * (Ds + Dt), chunks * V * (Ds + Dt) * e + N * (Ds + Dt) * e + N * V * 8)
    # the logit-level kernel the launcher picks for float32 logits: the row kernel (the row in
    # registers over a cluster, one read) on sm_90, else the streaming kernel (2 or 3 passes)
    row = _pick(kernels, "distill_row_kernel") or _pick(kernels, "distill_kernel")
    if row is not None and row.kernel == "distill_row_kernel":
        c = row.rec.get("num_ctas", 1)
        parts[row.name] = _rows_stream(m, row, N * c, V / c, 1, 8, e)
    elif row is not None:
        passes = 2 if row.divergence in TWO_PASS else 3
        parts[row.name] = _rows_stream(m, row, N, V, passes, 8, e)
    parts["cublas: grad_hidden"] = _cublas(m, 2.0 * N * V * Ds,
                                           N * V * e + flushes * V * Ds * e + N * Ds * e)
    mm = {tag: _pick(kernels, "mm_kernel", tag) for tag in ("EPI=2", "EPI=3", "EPI=4")}
    if flushes > 1 and all(mm.values()):
        ests = []
        for i in range(flushes):
            tag, acc = ("EPI=2", 4.0) if i == 0 else \
                (("EPI=4", 6.0) if i == flushes - 1 else ("EPI=3", 8.0))
            ests.append(estimate_mm(m, mm[tag], V, Ds, min(ring, N - i * ring), acc))
        parts["mm_kernel: grad_weight (split planes)"] = sequence(ests)
    else:
        parts["cublas: grad_weight"] = _cublas(m, 2.0 * N * V * Ds,
                                               N * V * e + N * Ds * e + V * Ds * e)
    return sequence(list(parts.values())), parts


def gemm_floor_s(m: Machine, N: int, V: int, Ds: int, Dt: int) -> float:
    return 2.0 * N * V * (3 * Ds + Dt) / m.gemm_flops_s


# ---- the table --------------------------------------------------------------------------------

COLUMNS = ["kernel", "backend", "divergence", "dtype", "N", "V", "D", "instr_per_elem",
           "mufu_per_elem", "hbm_bytes", "predicted_ms", "floor_ms", "ratio"]
EXTRA = ["preset", "mode", "extra_bytes", "arch", "bound", "mem_ms", "issue_ms", "mufu_ms", "gemm_ms", "regs",
         "spill_bytes", "threads", "ctas_per_sm", "warps_per_sm", "load_width",
         "barriers_per_tile", "shuffles_per_tile", "elems_per_thread_iter", "mma", "passes",
         "variant", "name"]


def _row(a: Optional[Analysis], est: Estimate, floor_s: float, **kw) -> Dict[str, Any]:
    t = est.time_s
    row = dict(kw)
    row.update(hbm_bytes=int(est.hbm_bytes), predicted_ms=round(t * 1e3, 4),
               floor_ms=round(floor_s * 1e3, 4) if floor_s else "",
               ratio=round(t / floor_s, 3) if floor_s else "",
               bound=est.bound, mem_ms=round(est.mem_s * 1e3, 4),
               issue_ms=round(est.issue_s * 1e3, 4), mufu_ms=round(est.mufu_s * 1e3, 4),
               gemm_ms=round(est.gemm_s * 1e3, 4))
    if a is not None:
        main = a.main
        tile = a.streams or [a.body]
        row.setdefault("instr_per_elem", round(a.instr_per_elem, 2) if a.per_elem else "")
        row.setdefault("mufu_per_elem", round(a.mufu_per_elem, 3) if a.per_elem else "")
        row.update(arch=a.arch, regs=a.regs, spill_bytes=a.spill, threads=a.threads,
                   ctas_per_sm=a.ctas_per_sm, warps_per_sm=a.warps_per_sm,
                   load_width=a.load_width,
                   barriers_per_tile=sum(lp.barriers for lp in tile),
                   shuffles_per_tile=sum(lp.shuffles for lp in tile),
                   elems_per_thread_iter=round(main.elems or a.body_elems, 3),
                   mma=a.mma_shape, passes=len(a.streams), variant=a.variant, name=a.name)
    return row


def build_table(analyses: Sequence[Analysis], m: Machine = H200) -> List[Dict[str, Any]]:
    rows = []
    by = {}
    for a in analyses:
        by.setdefault((a.op, a.backend), []).append(a)
    # logit level: every V of the presets, both dtypes, every divergence (the CUDA rows: the
    # resident kernel with the plan its launcher picks at that V, or the stream kernel)
    streams = {(a.dtype, a.divergence): a for a in by.get(("distill", "cuda"), [])
               if a.variant == "stream"}
    at_v = {(a.dtype, a.divergence, a.variant): a for a in by.get(("distill", "triton"), [])}
    for a0 in sorted(by.get(("distill", "triton"), []) + by.get(("distill", "cuda"), []),
                     key=lambda a: (a.backend, a.dtype, a.divergence)):
        if a0.variant != "bench" or a0.dtype not in DTYPES:
            continue
        e = ESIZE[a0.dtype]
        for V in LOGIT_VOCABS:
            # Triton: the kernel compiled at this V when the records have it (bench@V)
            a = at_v.get((a0.dtype, a0.divergence, f"bench@{V}"), a0) \
                if a0.backend == "triton" else a0
            shown = a
            if a.backend == "cuda":
                stream = streams.get((a.dtype, a.divergence))
                plan = resident_plan(m, a.dtype, a.divergence, V)
                if plan is not None:  # occupancy with the plan's threads and shared memory
                    a.threads = plan.threads
                    a.ctas_per_sm = _occupancy(m, a.regs, plan.threads, plan.smem_bytes)
                elif stream is not None:
                    shown = stream
                est = estimate_distill(m, a, N_TOKENS, V, stream)
            else:
                est = estimate_distill(m, a, N_TOKENS, V)
            floor = N_TOKENS * V * 3 * e / m.hbm_bytes_s
            rows.append(_row(shown, est, floor, kernel="distill_kernel", backend=a.backend,
                             divergence=a.divergence, dtype=a.dtype, N=N_TOKENS, V=V, D="",
                             preset="gpu-logits"))
    # the backward's scale kernel (when grad_output != 1)
    for a in by.get(("scale", "triton"), []) + by.get(("scale", "cuda"), []):
        if a.dtype not in DTYPES:
            continue
        e = ESIZE[a.dtype]
        est = estimate_scale(m, a, N_TOKENS, LINEAR_V)
        rows.append(_row(a, est, N_TOKENS * LINEAR_V * 2 * e / m.hbm_bytes_s,
                         kernel="scale_rows_kernel", backend=a.backend, divergence="-",
                         dtype=a.dtype, N=N_TOKENS, V=LINEAR_V, D="", preset="gpu-logits"))
    # features: 4 pairs of [8192, 4096], one call per pair (64 MB each: above the fuse limit)
    for a in sorted(by.get(("feature", "triton"), []) + by.get(("feature", "cuda"), []),
                    key=lambda a: (a.backend, a.dtype, a.divergence)):
        if a.variant != "onetile" or a.dtype not in DTYPES:
            continue
        e = ESIZE[a.dtype]
        size_cuda_feature_block(m, a, FEATURE_D)
        est = sequence([estimate_feature(m, a, N_TOKENS, FEATURE_D)] * FEATURE_PAIRS)
        floor = FEATURE_PAIRS * N_TOKENS * FEATURE_D * 3 * e / m.hbm_bytes_s
        rows.append(_row(a, est, floor, kernel="feature_kernel", backend=a.backend,
                         divergence=a.divergence, dtype=a.dtype, N=N_TOKENS,
                         V="", D=FEATURE_D, preset="gpu-feature"))
    # linear: the floor, each mode's kernels, then the whole op against the floor
    floor = gemm_floor_s(m, N_TOKENS, LINEAR_V, LINEAR_D, LINEAR_D)
    for div in LINEAR_DIVERGENCES:
        rows.append(_row(None, Estimate(gemm_s=floor, flops=floor * m.gemm_flops_s), floor,
                         kernel=GEMM_FLOOR, backend="cublas", divergence=div, dtype="bf16",
                         N=N_TOKENS, V=LINEAR_V, D=LINEAR_D, preset="gpu-linear", mode="floor",
                         instr_per_elem="", mufu_per_elem=""))
    for mode, variant, estimate in (("fused", "bench", estimate_linear),
                                    ("chunked", "chunked", estimate_chunked)):
        own = by.get(("linear", "triton"), []) + \
            (by.get(("distill", "triton"), []) if mode == "chunked" else [])
        lin = [a for a in own if a.variant == variant and a.arch == m.arch]
        mms = {a.name: a for a in lin if a.kernel == "mm_kernel"}
        for div in dict.fromkeys(a.divergence for a in lin if a.kernel != "mm_kernel"):
            ks = {a.name: a for a in lin if a.divergence == div and a.kernel != "mm_kernel"}
            ks.update(mms)
            total, parts = estimate(m, ks, N_TOKENS, LINEAR_V, LINEAR_D, LINEAR_D)
            first = len(rows)
            for name, est in parts.items():
                a = ks.get(name)
                own_floor = est.flops / m.gemm_flops_s  # its GEMM work at cuBLAS's rate
                common = dict(divergence=div, N=N_TOKENS, V=LINEAR_V, D=LINEAR_D,
                              preset="gpu-linear", mode=mode)
                if a is None:
                    k = name.split(":")[0]
                    rows.append(_row(None, est, own_floor, kernel=name,
                                     backend="cublas" if k == "cublas" else "triton",
                                     dtype="bf16", instr_per_elem="", mufu_per_elem="",
                                     **common))
                    continue
                per_elem = {}
                if a.kernel == "linear_grad_kernel":
                    per_elem = dict(instr_per_elem=round(a.body.instr / a.body_elems, 2),
                                    mufu_per_elem=round(a.body.mufu_total / a.body_elems, 3))
                tag = re.search(r",(PASS=\d)\]$", a.name)
                rows.append(_row(a, est, own_floor,
                                 kernel=a.kernel + (f"[{tag.group(1)}]" if tag else ""),
                                 backend="triton", dtype=a.dtype, **common, **per_elem))
            epi = [r for r in rows[first:] if isinstance(r.get("instr_per_elem"), float)
                   and r["kernel"].startswith("linear_")]
            rows.append(_row(None, total, floor, kernel=f"linear_{mode} (fwd+bwd)",
                             backend="triton", divergence=div, dtype="bf16", N=N_TOKENS,
                             V=LINEAR_V, D=LINEAR_D, mode=mode,
                             instr_per_elem=round(sum(r["instr_per_elem"] for r in epi), 2)
                             if epi else "",
                             mufu_per_elem=round(sum(r["mufu_per_elem"] for r in epi), 3)
                             if epi else "",
                             extra_bytes=int(linear_extra_bytes(mode, N_TOKENS, LINEAR_V,
                                                                LINEAR_D, LINEAR_D)),
                             preset="gpu-linear",
                             mma=" ".join(sorted({r["mma"] for r in rows[first:]
                                                  if r.get("mma")}))))
    return rows


# ---- compile + analyse ------------------------------------------------------------------------


def analyses_for(arch: int, records: Optional[List[Dict[str, Any]]] = None,
                 cuda: bool = True, jobs: int = 1, cache: Optional[str] = None,
                 log=None) -> List[Analysis]:
    """Compiles (or takes) the Triton records of `arch`, adds the extension's CUDA kernels,
    analyses them all."""
    m = MACHINES.get(arch, H200)
    if records is None:
        records = compile_records(arch, jobs=jobs, cache=cache, log=log)
    out = [analyse(r, m) for r in records if r["arch"] == arch]
    if cuda:
        out += [analyse(r, m) for r in cuda_records(arch)]
    return out


def compile_records(arch: int, jobs: int = 1, cache: Optional[str] = None, log=None):
    """Triton records for `arch`: compiled in this process (jobs == 1, TRITON_INTERPRET unset)
    or in `jobs` fresh processes."""
    from fastdistill.bench import aot
    if jobs > 1 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return aot.compile_in_subprocess([arch], cache=cache, jobs=jobs, vocabs=LOGIT_VOCABS)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return aot.compile_all((arch,), cache=cache, log=log, vocabs=LOGIT_VOCABS)


# ---- output -----------------------------------------------------------------------------------


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ["preset", "kernel", "backend", "divergence", "dtype", "V", "instr/elem",
            "MUFU/elem", "bar/shfl per tile", "load", "regs", "CTAs/SM", "GB",
            "predicted ms", "bound", "floor ms", "ratio", "extra GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bs = "" if r.get("barriers_per_tile") is None else \
            f"{r.get('barriers_per_tile', '')}/{r.get('shuffles_per_tile', '')}"
        lines.append("| " + " | ".join(str(x) for x in (
            r["preset"], r["kernel"] + (f" ({r['mma']})" if r.get("mma") else ""), r["backend"],
            r["divergence"], r["dtype"], r["V"], r["instr_per_elem"], r["mufu_per_elem"], bs,
            r.get("load_width", ""), r.get("regs", ""), r.get("ctas_per_sm", ""),
            f"{r['hbm_bytes'] / 1e9:.2f}", r["predicted_ms"], r["bound"], r["floor_ms"],
            r["ratio"], f"{r['extra_bytes'] / 1e9:.2f}" if r.get("extra_bytes") else ""))
            + " |")
    return "\n".join(lines)


def write_csv(rows: List[Dict[str, Any]], path: str, header: str = "") -> None:
    with open(path, "w", newline="") as f:
        if header:
            f.write(f"# {header}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS + EXTRA, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS + EXTRA})


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def show_loop(analyses: Sequence[Analysis], pattern: str) -> str:
    """The loop bodies (steady-state path marked '*', nested loops 'i') of the kernels whose
    name contains `pattern`."""
    out = []
    for a in analyses:
        if pattern not in a.name and pattern not in a.rec.get("mangled", ""):
            continue
        cfg = S.CFG(a.rec["sass"])
        out.append(f"==== {a.name} (sm_{a.arch}, {a.threads} threads, {a.regs} registers)")
        for lp, info in zip(cfg.loops, a.loops):
            per = f", {info.instr / info.elems:.2f} instr/elem" if info.elems else ""
            out.append(f"-- loop {info.start:05x}-{info.end:05x} ({info.kind}, depth "
                       f"{info.depth}): {info.instr} instructions on the path ({info.instr_static}"
                       f" in the body), {info.elems:g} elements per thread{per}, MUFU "
                       f"{info.mufu}, {info.barriers} BAR, {info.shuffles} SHFL, MMA {info.mma}")
            out.append(S.loop_listing(cfg, lp))
        if not cfg.loops or a.body_elems:
            per = f", {a.body.instr / a.body_elems:.2f} instr/elem" if a.body_elems else ""
            out.append(f"-- loop-free path: {a.body.instr} instructions, {a.body_elems:g} "
                       f"elements per thread{per}, MUFU {a.body.mufu}")
            if a.body_elems:  # a kernel whose work is its loop-free path: the path itself
                path = cfg.steady_path(None, must_mufu=a.kernel == "distill_row_kernel")
                inner = cfg.inner_blocks(None)
                out.append("\n".join(f"* {x.addr:05x}: {x.text}"
                                     for x in cfg.path_instrs(path, inner)))
    return "\n".join(out) if out else f"no kernel matches {pattern!r}"


# ---- calibration ------------------------------------------------------------------------------

PROVIDER_BACKEND = {"fastdistill-triton": "triton", "fastdistill-cuda": "cuda",
                    "fastdistill-fused": "triton", "fastdistill-chunked": "triton",
                    "gemm-floor": "cublas"}


def predicted_for(rows: List[Dict[str, Any]], op: str, provider: str, divergence: str,
                  dtype: str, N: int, V: int) -> Optional[Dict[str, Any]]:
    """The model row matching one measured point of the bench (same op, backend, divergence,
    dtype, V), scaled linearly to its N."""
    backend = PROVIDER_BACKEND.get(provider)
    if backend is None:
        return None
    kernel = {"distill": "distill_kernel", "feature": "feature_kernel",
              "linear": {"fastdistill-chunked": "linear_chunked (fwd+bwd)",
                         "gemm-floor": GEMM_FLOOR}.get(provider, "linear_fused (fwd+bwd)")
              }.get(op)
    best = None
    for r in rows:
        if r["kernel"] != kernel or r["backend"] != backend or r["dtype"] != dtype:
            continue
        if op != "feature" and r["divergence"] != divergence:
            continue
        if op == "feature" and r["divergence"] != "mse":
            continue
        if op != "feature" and str(r["V"]) != str(V):
            continue
        best = r
    if best is None:
        return None
    out = dict(best)
    scale = N / float(best["N"])
    out["predicted_ms"] = float(best["predicted_ms"]) * scale
    return out


def calibrate(model_rows: List[Dict[str, Any]], result_paths: Sequence[str]) -> str:
    """measured / predicted for every fastdistill point of the bench results that the model
    covers, and the geometric mean per (kernel, backend): the factor to apply to the model."""
    points = []
    for path in result_paths:
        for r in read_csv(path):
            if not r.get("time_s") or r.get("error"):
                continue
            op = r.get("op") or "distill"
            pred = predicted_for(model_rows, op, r["provider"], r.get("divergence", "forward_kl"),
                                 r.get("dtype", "bf16"), int(r["N"]), int(r["V"] or 0))
            if pred is None:
                continue
            measured = float(r["time_s"]) * 1e3
            points.append((pred["kernel"], pred["backend"], r.get("divergence", ""),
                           r.get("dtype", ""), r["N"], r["V"], measured,
                           pred["predicted_ms"], pred["bound"]))
    if not points:
        return "no measured point matches a model row (need the bench CSV columns op, " \
               "provider, divergence, dtype, N, V, time_s)"
    lines = ["| kernel | backend | divergence | dtype | N | V | measured ms | predicted ms | "
             "bound | measured / predicted |", "|" + "---|" * 10]
    groups: Dict[Tuple[str, str], List[float]] = {}
    for k, b, d, dt, n, v, meas, pred, bound in points:
        f = meas / pred if pred else float("nan")
        groups.setdefault((k, b), []).append(f)
        lines.append(f"| {k} | {b} | {d} | {dt} | {n} | {v} | {meas:.3f} | {pred:.3f} | "
                     f"{bound} | {f:.2f} |")
    lines += ["", "| kernel | backend | points | factor (geometric mean of measured / "
              "predicted) | min | max |", "|---|---|---|---|---|---|"]
    for (k, b), fs in sorted(groups.items()):
        g = math.exp(sum(math.log(f) for f in fs) / len(fs))
        lines.append(f"| {k} | {b} | {len(fs)} | {g:.3f} | {min(fs):.3f} | {max(fs):.3f} |")
    return "\n".join(lines)


# ---- CLI --------------------------------------------------------------------------------------


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() \
            or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdistill.bench.roofline",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MACHINES),
                    help="the SASS and the machine to model (90: H200, 80: A100)")
    ap.add_argument("--csv", nargs="?", const="roofline.csv", default=None,
                    help="write the table as CSV (default path roofline.csv)")
    ap.add_argument("--show-loop", metavar="KERNEL",
                    help="print the loop bodies of the kernels whose name contains KERNEL")
    ap.add_argument("--calibrate", nargs="+", metavar="RESULTS_CSV",
                    help="bench results CSVs: measured / predicted per kernel")
    ap.add_argument("--model", metavar="ROOFLINE_CSV",
                    help="with --calibrate: take the model rows from this CSV instead of "
                         "compiling")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--cache", default=None, help="compile cache directory")
    ap.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    args = ap.parse_args(argv)
    m = MACHINES[args.arch]
    if args.calibrate and args.model:
        print(calibrate(read_csv(args.model), args.calibrate))
        return 0
    analyses = analyses_for(args.arch, cuda=not args.no_cuda, jobs=args.jobs, cache=args.cache,
                            log=(lambda s: print(s, file=sys.stderr, flush=True)))
    if args.show_loop:
        print(show_loop(analyses, args.show_loop))
        return 0
    rows = build_table(analyses, m)
    header = (f"fastdistill roofline | {datetime.date.today().isoformat()} | commit {_commit()} | "
              f"sm_{args.arch} SASS, {m.name}: {m.sms} SMs x {m.schedulers} schedulers at "
              f"{m.clock_hz / 1e9:.2f} GHz, {m.hbm_bytes_s / 1e12:.1f} TB/s, MUFU "
              f"{m.mufu_per_clk_sm}/clk/SM, GEMM {m.gemm_flops_s / 1e12:.0f} TFLOP/s")
    print(header)
    print(format_table(rows))
    if args.csv:
        write_csv(rows, args.csv, header)
        print(f"csv: {args.csv}")
    if args.calibrate:
        print()
        print(calibrate(rows, args.calibrate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
