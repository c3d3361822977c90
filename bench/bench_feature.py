"""Feature distillation over 4 layer pairs (MSE, forward + backward): FeatureDistillLoss against
the obvious eager composition ``sum((s - t).pow(2).mean()) / 4`` and its torch.compile.

    python bench/bench_feature.py                       # CPU, N=2048, D=1024, fp32 and bf16
    python bench/bench_feature.py --device cuda         # GPU, N=8192, D=4096, bf16
    python bench/bench_feature.py --append bench/RESULTS.md

Every (variant, dtype) runs in fresh subprocesses (on CPU one for the time, one for the memory),
so one measurement's caches and allocator state do not leak into the next. Reported per variant:

- time: median of forward + backward (CPU: ``time.perf_counter`` over --reps runs after a
  warm-up, and their minimum, the run least disturbed by other work on the machine; GPU:
  ``triton.testing.do_bench``, median). CPU also reports the median process CPU time (all
  threads): with ``--threads 1`` it is the work done, whatever else runs on the machine.
- peak extra memory: the most memory in use during one forward + backward beyond the inputs
  (the student gradients, 4 x N x D, are included: they are part of every variant's output).
  GPU: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call. CPU: peak RSS
  growth, ``VmHWM - VmRSS`` from /proc/self/status with the high-water mark reset through
  /proc/self/clear_refs just before the call; the subprocess runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every large tensor with mmap and returns
  it at free (otherwise freed heap memory is reused unseen and the growth is under-counted);
  the timing process keeps the default allocator (mmap for every block would time page faults).
- GB/s (GPU): useful bytes / time, bytes = 4 pairs x N x D x (read s + read t + write grad)
  element sizes, the same count for every variant, next to the device's copy bandwidth
  (a large ``copy_``, read + write) as the ceiling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PAIRS = 4
# fd: FeatureDistillLoss as constructed by default (fuse="auto"); fd_fused / fd_per_pair force
# one concatenated kernel call / one call per pair
VARIANTS = ("eager", "compile", "fd", "fd_fused", "fd_per_pair")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---- worker: one (variant, dtype) ----------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def make_step(variant: str, dtype, D: int):
    import torch
    import fastdistill as fd

    if variant in ("eager", "compile"):
        def eager(students, teachers):
            return sum((s - t).pow(2).mean() for s, t in zip(students, teachers)) / PAIRS

        fn = torch.compile(eager) if variant == "compile" else eager

        def step(s_hs, t_hs):
            fn(s_hs[1:], t_hs[1:]).backward()
        return step

    fuse = {"fd": "auto", "fd_fused": True, "fd_per_pair": False}[variant]
    crit = fd.FeatureDistillLoss(fd.LayerMap.uniform(PAIRS, PAIRS), D, D, "mse", project=False,
                                 fuse=fuse)

    def step(s_hs, t_hs):
        crit(s_hs, t_hs).backward()
    return step


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    dev = torch.device(args.device)
    N, D = args.n, args.d
    torch.manual_seed(0)
    # index 0 is the embedding output, as in a Hugging Face hidden_states tuple (unused)
    s_hs = [torch.randn(N, D, device=dev, dtype=dtype).requires_grad_() for _ in range(PAIRS + 1)]
    t_hs = [torch.randn(N, D, device=dev, dtype=dtype) for _ in range(PAIRS + 1)]
    step = make_step(args.variant, dtype, D)

    def run():
        for x in s_hs:
            x.grad = None
        step(s_hs, t_hs)

    run()  # warm-up: compilation, thread pools, lazy initialisation
    out = {"variant": args.variant, "dtype": args.dtype, "N": N, "D": D}
    if dev.type == "cuda":
        import triton.testing
        for x in s_hs:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(s_hs, t_hs)
        torch.cuda.synchronize()
        out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        out["ms"] = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        elt = torch.empty((), dtype=dtype).element_size()
        out["gbps"] = PAIRS * N * D * 3 * elt / (out["ms"] * 1e-3) / 1e9
    elif args.measure == "mem":
        for x in s_hs:
            x.grad = None
        base = _status_kib("VmRSS")
        if _reset_peak_rss():
            step(s_hs, t_hs)
            out["peak_extra_mib"] = (_status_kib("VmHWM") - base) / 1024
    else:
        times, cpu = [], []
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out["ms"] = statistics.median(times) * 1e3
        out["min_ms"] = min(times) * 1e3
        out["cpu_ms"] = statistics.median(cpu) * 1e3
    return out


def copy_bandwidth_gbps() -> float:
    """Device ceiling: a 1 GiB ``copy_`` (read + write), median of do_bench."""
    import torch
    import triton.testing
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3) / 1e9


# ---- driver ------------------------------------------------------------------------------------

def _describe(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model})"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit(results_file=None) -> str:
    """HEAD, with +dirty when tracked files other than the results file changed."""
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
        cmd = ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
        if results_file:
            cmd.append(f":(exclude){os.path.abspath(results_file)}")
        dirty = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(rows, device: str, ceiling=None) -> str:
    gpu = device == "cuda"
    head = "| dtype | variant | median ms |" + (" GB/s |" if gpu else " min ms | CPU ms |") \
        + " peak extra MiB |"
    lines = [head, "|" + " --- |" * (5 if gpu else 6)]
    for r in rows:
        mem = f"{r['peak_extra_mib']:.1f}" if "peak_extra_mib" in r else "n/a"
        extra = f"{r['gbps']:.0f}" if gpu else f"{r['min_ms']:.3f} | {r['cpu_ms']:.3f}"
        lines.append(f"| {r['dtype']} | {r['variant']} | {r['ms']:.3f} | {extra} | {mem} |")
    if ceiling:
        lines.append(f"\ndevice copy bandwidth (ceiling): {ceiling:.0f} GB/s")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--n", type=int, help="tokens per layer (CPU 2048, GPU 8192)")
    ap.add_argument("--d", type=int, help="hidden width (CPU 1024, GPU 4096)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (CPU both, GPU bf16)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=20, help="timed runs on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--append", help="append the table, with date, device, commit and command, "
                                     "to this markdown file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("time", "mem"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.n = args.n or (8192 if gpu else 2048)
    args.d = args.d or (4096 if gpu else 1024)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if gpu:
        import torch
        if not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA GPU; none is available here")
    dtypes = (args.dtypes or ("bf16" if gpu else "fp32,bf16")).split(",")
    # other work on the machine skews CPU timings: recorded next to the figures
    load = _load()
    rows = []
    # CPU: time with the default allocator, memory in a second process with mmap for every
    # large block (see the module doc); GPU: one process measures both
    runs = [("time", {}), ("mem", {"MALLOC_MMAP_THRESHOLD_": "65536"})] if not gpu \
        else [("time", {})]
    for dt in dtypes:
        for v in args.variants.split(","):
            row = {}
            for measure, extra_env in runs:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", v,
                       "--dtype", dt, "--device", args.device, "--n", str(args.n), "--d",
                       str(args.d), "--reps", str(args.reps), "--threads", str(args.threads),
                       "--measure", measure]
                res = subprocess.run(cmd, capture_output=True, text=True,
                                     env=dict(os.environ, **extra_env))
                if res.returncode != 0:
                    print(f"{v} {dt} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    break
                row.update(json.loads(res.stdout.strip().splitlines()[-1]))
            else:
                rows.append(row)
                print(f"  {dt} {v}: {row['ms']:.3f} ms", file=sys.stderr)
    ceiling = copy_bandwidth_gbps() if gpu else None
    text = table(rows, args.device, ceiling)
    print(text)
    if args.append:
        cmd = "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:]))
        with open(args.append, "a") as f:
            f.write(f"\n## feature distillation, 4 pairs, MSE fwd+bwd, N={args.n}, D={args.d}\n\n"
                    f"- date: {datetime.date.today().isoformat()}\n"
                    f"- device: {_describe(args.device)}\n"
                    f"- load average (1, 5, 15 min) before / after: {load} / {_load()}\n"
                    f"- commit: {_commit(args.append)}\n"
                    f"- command: `{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
