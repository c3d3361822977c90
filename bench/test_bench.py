"""pytest-benchmark microbenchmarks of every op and backend.

    pytest bench                         # CPU sizes; GPU sizes too when a GPU is present
    pytest bench --benchmark-disable     # smoke test (one run each; part of `make test`)

Each records in extra_info the median time, the peak extra memory beyond inputs and gradients
and the achieved GB/s or GFLOP/s (fastdistill/bench/measure.py says how each is measured). On a
GPU the timing is triton.testing.do_bench (CUDA events, synchronised); the GPU inputs (hundreds
of MB) are far larger than L2, so successive runs do not hit warm caches.
"""

import pytest
import torch

from fastdistill.bench import cases, measure

CPU_SIZES = {"distill": dict(N=64, V=4096), "linear": dict(N=64, V=2048, D=64),
             "feature": dict(N=256, D=512, pairs=4)}
GPU_SIZES = {"distill": dict(N=8192, V=128256), "linear": dict(N=8192, V=128256, D=4096),
             "feature": dict(N=8192, D=4096, pairs=4)}
SKIP_ON_CPU = ("torch-compile",)  # compile time would dominate a smoke run


def points(device, sizes):
    out = []
    for op, size in sizes.items():
        for p in cases.PROVIDERS[op](device):
            if device == "cpu" and p in SKIP_ON_CPU:
                continue
            out.append(pytest.param(op, p, size, id=f"{op}-{p}"))
    return out


def _run(benchmark, spec):
    run, reset, grad_bytes, moved, flops = cases.build(spec)

    def once():
        run()
        reset()

    if spec["device"] == "cuda":
        m = measure.measure_cuda(run, reset, grad_bytes)
        benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
        stats = getattr(benchmark, "stats", None)
        m = {"time_s": stats.stats.median if stats else float("nan")}
        if not benchmark.disabled:
            m["peak_extra_bytes"] = measure.measure_cpu(dict(spec, repeats=1)).get(
                "peak_extra_bytes", float("nan"))
    benchmark.extra_info.update(m)
    t = m.get("time_s")
    if t and t == t:
        if flops:
            benchmark.extra_info["gflop_per_s"] = flops / t / 1e9
        else:
            benchmark.extra_info["gb_per_s"] = moved / t / 1e9


@pytest.mark.parametrize("op,provider,size", points("cpu", CPU_SIZES))
def test_cpu(benchmark, op, provider, size):
    _run(benchmark, dict(op=op, provider=provider, dtype="fp32", device="cpu",
                         divergence="jsd" if op == "linear" else "forward_kl", hard_weight=0.5,
                         soft_weight=0.5, temperature=1.0, Dt=size.get("D"), **size))


@pytest.mark.gpu
@pytest.mark.parametrize("op,provider,size",
                         points("cuda", GPU_SIZES) if torch.cuda.is_available() else [])
def test_gpu(benchmark, op, provider, size):
    _run(benchmark, dict(op=op, provider=provider, dtype="bf16", device="cuda",
                         divergence="jsd" if op == "linear" else "forward_kl", hard_weight=0.0,
                         soft_weight=1.0, temperature=1.0, Dt=size.get("D"), **size))
