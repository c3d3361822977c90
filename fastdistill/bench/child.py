"""Child process of the CPU benchmark: ``python -m fastdistill.bench.child '<spec json>'``.

Builds the problem, runs it once to warm up (torch.compile compiles here), resets the process's
peak-RSS mark (/proc/self/clear_refs, "5"), then runs it again: the new peak above the resident
size before that run, minus the gradient, is the peak extra memory; the median of the timed
runs is the time. Prints one JSON line.
"""

import json
import statistics
import sys
import time

import torch

from fastdistill.bench.cases import build


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main():
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    run, reset, grad_bytes, moved, flops = build(spec)
    run()  # warm-up: compile, thread pools, first-touch of the inputs
    reset()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS") * 1024
    times = []
    for i in range(max(1, spec.get("repeats", 2))):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = _status_kb("VmHWM") * 1024
        reset()
    print(json.dumps({"time_s": statistics.median(times),
                      "peak_extra_bytes": max(0, peak - base - grad_bytes),
                      "bytes_moved": moved, "flops": flops}))


if __name__ == "__main__":
    main()
