"""Timing and peak-memory measurement of one provider on one problem.

CPU: every (provider, size) runs in a fresh child process (``python -m fastdistill.bench.child``)
so allocator state does not carry over; after a warm-up run the child resets its peak-RSS mark
(/proc/self/clear_refs), and the first timed run's peak resident size (VmHWM) above the resident
size before it is the peak memory; the median of the timed runs is the time. GPU: in-process,
CUDA-event timing through triton.testing.do_bench and ``torch.cuda.max_memory_allocated`` above
the memory held after the inputs were created.

"Peak extra memory" excludes the inputs and the student gradient (an output every provider must
produce): peak - baseline - gradient bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict


def measure_cpu(spec: dict, timeout: float = 1800.0) -> Dict[str, float]:
    """Runs one (provider, size) spec in a child process and returns its measurements."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # glibc serves blocks above this size with mmap and returns them on free, so the resident
    # size follows the live allocations (otherwise temporaries reuse heap pages touched earlier
    # and never show up in the peak)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    p = subprocess.run([sys.executable, "-m", "fastdistill.bench.child", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure_cuda(run, reset, grad_bytes: int) -> Dict[str, float]:
    """In-process GPU measurement; `reset()` drops gradients between runs."""
    import torch
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    reset()

    def once():
        run()
        reset()

    ms = triton.testing.do_bench(once, warmup=25, rep=200, return_mode="median")
    return {"time_s": ms / 1e3, "peak_extra_bytes": max(0, peak - base - grad_bytes)}


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large buffer)."""
    import torch
    n = (1 << 28) if device == "cuda" else (1 << 26)
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    if device == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100,
                                     return_mode="median")
        return 2 * x.numel() * 4 / (ms / 1e3)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times)
