"""GPU benchmarks of the fused losses against torch eager, torch.compile and Liger-Kernel.

    python bench/gpu_bench.py [RESULTS_DIR] [--budget SECONDS] [--no-compile] [--cpu-smoke]

Measures, in one run:
  * the device copy bandwidth (a large device-to-device copy, bytes read + written): the ceiling;
  * logit-level distillation forward + backward, N = 8192 tokens, V = 128256, bf16, forward_kl and
    jsd: fastdistill's cuda and triton backends, torch eager (log_softmax x 2 + kl_div, float32
    math), torch.compile of the same, Liger-Kernel's LigerKLDIVLoss / LigerJSD when importable;
  * feature MSE forward + backward, N = 8192, D = 4096, bf16, 4 layer pairs: fastdistill backends,
    torch eager, torch.compile.
For each: median time (triton.testing.do_bench, else CUDA events), peak extra memory
(torch.cuda.max_memory_allocated minus what was allocated before the step), and the bandwidth
achieved on the fewest bytes any implementation must move (inputs read once, gradient written
once) as a fraction of the measured copy bandwidth. Losses are cross-checked against torch
eager. Full results go to RESULTS_DIR/bench.json and bench.csv (default: $OUT if set, else
bench/out); a short table is printed last.

--cpu-smoke runs every code path on tiny CPU tensors (the cpu/torch backends stand in for the
GPU ones) to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fastdistill as fd  # noqa: E402
from fastdistill import backends  # noqa: E402


# ---- timing and memory -----------------------------------------------------------------------

def bench_ms(fn, device, rep_ms=200):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn, device):
    """Peak memory one call of fn() allocates beyond what exists before it (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def copy_bandwidth(device, nbytes):
    """Bytes read + written per second by a device-to-device copy."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3)


# ---- the implementations ---------------------------------------------------------------------

def eager_kl(s, t):
    """The usual hand-written distillation loss: float32 log-softmaxes and kl_div."""
    ls = torch.log_softmax(s.float(), -1)
    lt = torch.log_softmax(t.float(), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean")


def eager_jsd(s, t, beta=0.5):
    lq = torch.log_softmax(s.float(), -1)
    lp = torch.log_softmax(t.float(), -1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
    kl_p = F.kl_div(lm, lp, log_target=True, reduction="sum")
    kl_q = F.kl_div(lm, lq, log_target=True, reduction="sum")
    return (beta * kl_p + (1 - beta) * kl_q) / s.shape[0]


def liger_impls():
    """Liger-Kernel's losses over torch log-softmaxes (its documented use), if installed."""
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError as e:
        return {}, f"liger-kernel not importable ({e})"
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    jsd = LigerJSD(beta=0.5)

    def liger_kl(s, t):
        return kl(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))

    def liger_jsd(s, t):
        # LigerJSD(log_q student, log_p teacher): beta * KL(P||M) + (1 - beta) * KL(Q||M), mean
        return jsd(torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1))

    return {"forward_kl": liger_kl, "jsd": liger_jsd}, ""


def fused(backend, divergence):
    def f(s, t):
        return fd.distill_loss(s, t, divergence=divergence, beta=0.5, backend=backend)
    return f


# ---- cases -----------------------------------------------------------------------------------

class Runner:
    def __init__(self, device, budget_s, with_compile, bw):
        self.device, self.budget_s, self.with_compile, self.bw = device, budget_s, with_compile, bw
        self.t0 = time.time()
        self.rows = []
        self.deferred = []  # the slow torch.compile baselines, run last while time is left

    def left(self):
        return self.budget_s - (time.time() - self.t0)

    def run(self, group, impl, make_step, floor_bytes, info, ref_loss=None, cost_s=5.0):
        row = dict(group=group, impl=impl, **info, ms=None, peak_extra_mib=None,
                   eff_gbps=None, frac_of_copy=None, loss=None, rel_err_vs_eager=None, note="")
        if self.left() < cost_s:
            row["note"] = "skipped: time budget"
            self.rows.append(row)
            print(f"  {group:<22} {impl:<20} skipped (budget)", flush=True)
            return None
        try:
            step = make_step()
            loss = step()  # warm-up: compiles, autotunes, allocates
            row["loss"] = float(loss)
            if ref_loss is not None and math.isfinite(ref_loss):
                row["rel_err_vs_eager"] = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
            row["peak_extra_mib"] = peak_extra_mb(step, self.device)
            row["ms"] = bench_ms(step, self.device)
            gbps = floor_bytes / (row["ms"] * 1e-3) / 1e9
            row["eff_gbps"] = gbps
            row["frac_of_copy"] = gbps * 1e9 / self.bw
        except Exception as e:  # one failing baseline must not stop the others
            row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)
        print(f"  {group:<22} {impl:<20} {fmt(row['ms'], '.3f'):>9} ms  "
              f"{fmt(row['peak_extra_mib'], '.0f'):>7} MiB  {fmt(row['frac_of_copy'], '.2f'):>5} "
              f"{row['note']}", flush=True)
        return row["loss"]


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def logit_cases(r, N, V, dtype, impls_fused):
    dev = r.device
    gen = torch.Generator(device=dev).manual_seed(0)
    s0 = (torch.randn(N, V, device=dev, generator=gen) * 3).to(dtype)
    t0 = (torch.randn(N, V, device=dev, generator=gen) * 3).to(dtype)
    e = s0.element_size()
    floor = N * V * (e + e + e)  # read s and t once, write the gradient once
    info = dict(dtype=str(dtype).replace("torch.", ""), N=N, width=V)
    liger, why = liger_impls()
    for div, eager in (("forward_kl", eager_kl), ("jsd", eager_jsd)):
        group = f"logits {div}"
        s = s0.clone().requires_grad_()

        def step_of(fn, s=s):
            def make():
                def step():
                    s.grad = None
                    loss = fn(s, t0)
                    loss.backward()
                    return loss.detach()
                return step
            return make

        ref = r.run(group, "torch-eager", step_of(eager), floor, info, cost_s=10)
        for b in impls_fused:
            r.run(group, f"fastdistill-{b}", step_of(fused(b, div)), floor, info, ref)
        if div in liger:
            r.run(group, "liger", step_of(liger[div]), floor, info, ref)
        else:
            r.rows.append(dict(group=group, impl="liger", **info, note=why))
        if r.with_compile:
            r.deferred.append(lambda group=group, make=step_of(torch.compile(eager)), ref=ref:
                              r.run(group, "torch-compile", make, floor, info, ref, cost_s=90))


def feature_cases(r, N, D, layers, dtype, impls_fused):
    dev = r.device
    gen = torch.Generator(device=dev).manual_seed(1)
    ss = [torch.randn(N, D, device=dev, generator=gen).to(dtype).requires_grad_()
          for _ in range(layers)]
    ts = [torch.randn(N, D, device=dev, generator=gen).to(dtype) for _ in range(layers)]
    e = ss[0].element_size()
    floor = layers * N * D * (e + e + e)
    info = dict(dtype=str(dtype).replace("torch.", ""), N=N, width=D, layers=layers)
    group = f"feature mse x{layers}"

    def eager(s, t):
        return F.mse_loss(s.float(), t.float())

    def step_of(fn):
        def make():
            def step():
                for s in ss:
                    s.grad = None
                loss = sum(fn(s, t) for s, t in zip(ss, ts))
                loss.backward()
                return loss.detach()
            return step
        return make

    ref = r.run(group, "torch-eager", step_of(eager), floor, info)
    for b in impls_fused:
        r.run(group, f"fastdistill-{b}", step_of(
            lambda s, t, b=b: fd.feature_loss(s, t, kind="mse", backend=b)), floor, info, ref)
    if r.with_compile:
        r.deferred.insert(1, lambda: r.run(group, "torch-compile", step_of(torch.compile(eager)),
                                           floor, info, ref, cost_s=60))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT") or os.path.join(ROOT, "bench",
                                                                                    "out"))
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all cases")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.cpu_smoke:
        device = torch.device("cpu")
        sizes = dict(N=32, V=1037, fN=16, fD=96, copy=1 << 24)
        fused_b = [b for b in ("cpu", "torch") if backends.check(b, device)[0]]
        dtype = torch.float32  # CPU bf16 math is slow and not what is measured here
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (use --cpu-smoke to check this script on the CPU)")
        device = torch.device("cuda")
        sizes = dict(N=8192, V=128256, fN=8192, fD=4096, copy=4 << 30)
        fused_b = [b for b in ("cuda", "triton") if backends.check(b, device)[0]]
        dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}; backends: {backends.summary()}", flush=True)
    bw = copy_bandwidth(device, sizes["copy"])
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s", flush=True)
    r = Runner(device, args.budget, not args.no_compile, bw)
    logit_cases(r, sizes["N"], sizes["V"], dtype, fused_b)
    feature_cases(r, sizes["fN"], sizes["fD"], 4, dtype, fused_b)
    for task in r.deferred:  # forward_kl, feature, jsd
        task()

    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, copy_gbps=bw / 1e9, fastdistill=fd.__version__,
                backends=backends.summary(), elapsed_s=time.time() - r.t0)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(dict(meta=meta, results=r.rows), f, indent=1)
    keys = sorted({k for row in r.rows for k in row})
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(r.rows)

    print(f"\n{meta['device']}, copy {bw / 1e9:.0f} GB/s; 'of copy' = bytes that must move "
          "(inputs once, gradient once) / time / copy bandwidth")
    print(f"{'case':<22} {'impl':<20} {'ms':>9} {'MiB':>8} {'of copy':>8} {'rel err':>9}  note")
    for row in r.rows:
        print(f"{row['group']:<22} {row['impl']:<20} {fmt(row.get('ms'), '.3f'):>9} "
              f"{fmt(row.get('peak_extra_mib'), '.0f'):>8} {fmt(row.get('frac_of_copy'), '.2f'):>8} "
              f"{fmt(row.get('rel_err_vs_eager'), '.1e'):>9}  {row.get('note', '')}")
    failed = [row for row in r.rows if row.get("note", "").startswith("failed")
              and row["impl"].startswith("fastdistill")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
