"""Benchmark CLI: ``python -m fastdistill.bench`` or ``fastdistill-bench``.

Sweeps tokens (N) and vocabulary (V) for an op and compares, side by side in one run,
fastdistill's backends, torch eager, torch.compile and Liger-Kernel (when installed). Prints a
table, writes ``results.csv`` (one row per measured point, written and flushed as soon as the
point is measured, so a run that is killed keeps what it measured) and PNG plots (time and peak
extra memory against N, one line per provider and V) into ``--out``, and shows progress.
Device, versions and commit go into every output. With ``--predicted roofline.csv`` (from
``python -m fastdistill.bench.roofline --csv``) the fastdistill points show the model's
predicted time next to the measured one.

    python -m fastdistill.bench --preset cpu-logits      # issue targets on this machine
    python -m fastdistill.bench --op distill --N 1024 4096 --V 32768 65536
    python -m fastdistill.bench --preset gpu-linear --exclude torch-compile
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

from fastdistill.bench import cases, measure

PRESETS = {
    # logit-level loss against the naive composition, fp32 on CPU (targets: <= 5% of its time
    # and <= 5% of its extra memory; <= 2x the memory floor printed with it)
    "cpu-logits": dict(op="distill", device="cpu", dtype="fp32", N=[4096], V=[65536],
                       providers=["fastdistill-cpu", "torch-eager"]),
    # fused linear loss against materialised logits (target: <= 25% time, <= 5% memory)
    # (jsd with hard labels, the loss Liger's chunked torch.compile implementation computes)
    "cpu-linear": dict(op="linear", device="cpu", dtype="fp32", N=[4096], V=[65536], D=256,
                       providers=["gemm-floor", "fastdistill-chunked", "torch-eager",
                                  "liger-chunked"],
                       divergence="jsd", hard_weight=0.5, soft_weight=0.5),
    # the chunked mode against its own four GEMMs (target: <= 1.3x), forward KL; jsd + CE is
    # cpu-linear
    "cpu-linear-kl": dict(op="linear", device="cpu", dtype="fp32", N=[4096], V=[65536], D=256,
                          providers=["gemm-floor", "fastdistill-chunked"],
                          divergence="forward_kl"),
    "cpu-feature": dict(op="feature", device="cpu", dtype="fp32", N=[2048], D=1024, pairs=4,
                        providers=["fastdistill-cpu", "torch-eager", "torch-compile"]),
    "cpu-sweep": dict(op="distill", device="cpu", dtype="fp32", N=[512, 2048],
                      V=[8192, 32768]),
    "gpu-logits": dict(op="distill", device="cuda", dtype="bf16", N=[8192], V=[128256]),
    "gpu-sweep": dict(op="distill", device="cuda", dtype="bf16", N=[2048, 8192, 16384],
                      V=[32000, 128256, 262144]),
    "gpu-linear": dict(op="linear", device="cuda", dtype="bf16", N=[8192], V=[128256], D=4096),
    "gpu-feature": dict(op="feature", device="cuda", dtype="bf16", N=[8192], D=4096, pairs=4),
    # stored top-k teachers (K = 8, 64, 256; topk_tail="bucket") against the dense teacher:
    # time, peak extra memory and the teacher's bytes on disk per token
    "cpu-topk": dict(op="topk", device="cpu", dtype="fp32", N=[2048], V=[32768]),
    "gpu-topk": dict(op="topk", device="cuda", dtype="bf16", N=[8192], V=[128256]),
}


def commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str) -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "triton": tv, "commit": commit(),
            "date": datetime.date.today().isoformat()}


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="fastdistill-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--op", choices=sorted(cases.BUILDERS), default=None)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    ap.add_argument("--dtype", choices=sorted(cases.DTYPES), default=None)
    ap.add_argument("--N", type=int, nargs="+", default=None, help="token counts")
    ap.add_argument("--V", type=int, nargs="+", default=None, help="vocabulary sizes")
    ap.add_argument("--D", type=int, default=None, help="hidden size (linear, feature)")
    ap.add_argument("--pairs", type=int, default=None, help="layer pairs (feature)")
    ap.add_argument("--divergence", default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard-weight", type=float, default=None)
    ap.add_argument("--soft-weight", type=float, default=None)
    ap.add_argument("--providers", nargs="+", default=None)
    ap.add_argument("--exclude", nargs="+", default=[], metavar="PROVIDER",
                    help="leave these providers out (e.g. torch-compile)")
    ap.add_argument("--predicted", metavar="ROOFLINE_CSV", default=None,
                    help="the static model's table: print predicted times next to measured")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (CPU)")
    ap.add_argument("--out", default=os.path.join("bench", "out"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: points not started by then are skipped (and reported so)")
    ap.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                    help="CPU, for shared machines: at each size run every provider in this "
                         "process, one after another, ROUNDS times, and keep each one's best "
                         "time (no memory measurement): providers see the same load")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="with --interleave: wall time, or this process's CPU time (all its "
                         "threads; time other jobs take from the cores is not counted)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = ap.parse_args(argv)
    cfg = dict(op="distill", device="auto", dtype=None, N=None, V=None, D=None, pairs=None,
               providers=None, divergence="forward_kl", hard_weight=0.0, soft_weight=1.0)
    if args.preset:
        cfg.update(PRESETS[args.preset])
    for k in ("op", "device", "dtype", "N", "V", "D", "pairs", "providers", "divergence",
              "hard_weight", "soft_weight"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = cfg["device"] == "cuda"
    cfg["dtype"] = cfg["dtype"] or ("bf16" if gpu else "fp32")
    cfg["N"] = cfg["N"] or ([2048, 8192, 16384] if gpu else [512, 2048])
    cfg["V"] = cfg["V"] or ([32000, 128256, 262144] if gpu else [8192, 32768])
    cfg["D"] = cfg["D"] or (4096 if gpu else 256)
    cfg["pairs"] = cfg["pairs"] or 4
    cfg["providers"] = [p for p in cfg["providers"] or cases.PROVIDERS[cfg["op"]](cfg["device"])
                        if p not in args.exclude]
    return args, cfg


def run_point(spec: dict) -> dict:
    if spec["device"] == "cpu":
        return measure.measure_cpu(spec)
    try:
        run, reset, grad_bytes, moved, flops = cases.build(spec)
        out = measure.measure_cuda(run, reset, grad_bytes)
        out.update(bytes_moved=moved, flops=flops)
        return out
    except Exception as e:  # one failing provider must not stop the sweep
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args, cfg = parse(argv)
    env = environment(cfg["device"])
    os.makedirs(args.out, exist_ok=True)
    ceiling = measure.copy_bandwidth(cfg["device"])
    header = (f"# fastdistill bench | {env['date']} | {env['device']} | torch {env['torch']} | "
              f"triton {env['triton']} | commit {env['commit']} | op {cfg['op']} "
              f"{cfg['dtype']} " + (f"{cfg['divergence']} hard_weight={cfg['hard_weight']} | "
                                    if cfg["op"] != "feature" else f"{cfg['pairs']} pairs mse | ")
              + f"copy bandwidth {ceiling / 1e9:.1f} GB/s")
    print(header, flush=True)
    sizes = [(n, v) for n in cfg["N"] for v in (cfg["V"] if cfg["op"] != "feature" else [0])]
    points = [(p, n, v) for n, v in sizes for p in cfg["providers"]]
    model = load_model(args.predicted)
    rows = []
    if args.threads:
        torch.set_num_threads(args.threads)
    interleaved = {}
    if args.interleave:
        for n, v in sizes:
            interleaved.update(run_interleaved(
                [dict(op=cfg["op"], provider=p, N=n, V=v, D=cfg["D"], Dt=cfg["D"],
                      pairs=cfg["pairs"], dtype=cfg["dtype"], device=cfg["device"],
                      divergence=cfg["divergence"], temperature=args.temperature,
                      hard_weight=cfg["hard_weight"], soft_weight=cfg["soft_weight"])
                 for p in cfg["providers"]], args.interleave, args.clock))
    t_start = time.time()
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as out:
        writer = start_csv(out, env, cfg, ceiling)
        for i, (prov, n, v) in enumerate(points, 1):
            spec = dict(op=cfg["op"], provider=prov, N=n, V=v, D=cfg["D"], Dt=cfg["D"],
                        pairs=cfg["pairs"], dtype=cfg["dtype"], device=cfg["device"],
                        divergence=cfg["divergence"], temperature=args.temperature,
                        hard_weight=cfg["hard_weight"], soft_weight=cfg["soft_weight"],
                        repeats=args.repeats)
            print(f"[{i}/{len(points)}] {prov:22s} N={n} V={v} ... ", end="", flush=True)
            if args.interleave:
                r = dict(interleaved[(prov, n, v)])
            elif args.budget is not None and time.time() - t_start > args.budget:
                r = {"error": f"skipped: time budget of {args.budget:.0f}s spent"}
            else:
                r = run_point(spec)
            r.update(provider=prov, N=n, V=v)
            if cfg["op"] == "topk":
                r["disk_bytes_per_token"] = cases.disk_bytes_per_token(spec)
            add_prediction(r, model, cfg)
            rows.append(r)
            add_floor_ratios(rows)  # the floor runs first at each size: known when written
            writer.writerow(csv_row(r, cfg))
            out.flush()
            msg = r.get("error") or (f"{r['time_s'] * 1e3:9.2f} ms  "
                                     f"{r['peak_extra_bytes'] / 2**20:9.1f} MiB extra")
            if r.get("vs_gemm_floor") and prov != "gemm-floor":
                msg += f"  ({r['vs_gemm_floor']:.3f}x the GEMM floor)"
            if "disk_bytes_per_token" in r and "error" not in r:
                msg += f"  {r['disk_bytes_per_token']:8.0f} B/token on disk"
            if r.get("predicted_ms"):
                msg += f"  (predicted {r['predicted_ms']:.2f} ms)"
            print(f"{msg}  ({time.time() - t_start:.0f}s)", flush=True)
    table = format_table(rows, ceiling, cfg)
    print(header)
    print(table)
    if not args.no_plot:
        for path in plot(rows, env, cfg, args.out):
            print(f"plot: {path}")
    return 0


def run_interleaved(specs, rounds, clock="wall"):
    """{(provider, N, V): result}: every spec built in this process and warmed up once, then
    `rounds` rounds of one run each, in turn; each provider's best time (wall or this process's
    CPU time)."""
    tick = time.process_time if clock == "cpu" else time.perf_counter
    built, out = [], {}
    for spec in specs:
        key = (spec["provider"], spec["N"], spec["V"])
        try:
            run, reset, grad_bytes, moved, flops = cases.build(spec)
            run()
            reset()
            built.append((key, run, reset, moved, flops))
        except Exception as e:  # one failing provider must not stop the others
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    best = {key: float("inf") for key, *_ in built}
    for _ in range(rounds):
        for key, run, reset, _, _ in built:
            t0 = tick()
            run()
            best[key] = min(best[key], tick() - t0)
            reset()
    for key, _, _, moved, flops in built:
        out[key] = {"time_s": best[key], "peak_extra_bytes": 0, "bytes_moved": moved,
                    "flops": flops}
    return out


def load_model(path):
    """Rows of a roofline CSV, or None."""
    if not path:
        return None
    try:
        from fastdistill.bench import roofline
        return roofline.read_csv(path)
    except OSError as e:
        print(f"no predictions: cannot read {path} ({e})", file=sys.stderr)
        return None


def add_prediction(r, model, cfg):
    """predicted_ms and measured / predicted for a fastdistill point the model covers."""
    if not model or "error" in r:
        return
    from fastdistill.bench import roofline
    p = roofline.predicted_for(model, cfg["op"], r["provider"], cfg["divergence"], cfg["dtype"],
                               r["N"], r["V"])
    if p is not None:
        r["predicted_ms"] = p["predicted_ms"]
        r["measured_over_predicted"] = r["time_s"] * 1e3 / p["predicted_ms"]


def add_floor_ratios(rows) -> None:
    """vs_gemm_floor = time / the gemm-floor provider's time at the same (N, V) (linear)."""
    floor = {(r["N"], r["V"]): r["time_s"] for r in rows
             if r["provider"] == "gemm-floor" and "error" not in r}
    for r in rows:
        f = floor.get((r["N"], r["V"]))
        if f and "error" not in r:
            r["vs_gemm_floor"] = r["time_s"] / f


def format_table(rows, ceiling, cfg) -> str:
    ref = "fastdistill-dense" if cfg["op"] == "topk" else "torch-eager"
    base = {(r["N"], r["V"]): r for r in rows if r["provider"] == ref and "error" not in r}
    lin = cfg["op"] == "linear"
    add_floor_ratios(rows)
    # the floor column: linear rows against the gemm-floor provider (the same GEMMs alone);
    # the others against the memory floor, the ideal fused kernel's traffic (inputs read once,
    # gradients written once) at the copy bandwidth measured in the same run
    fcols = "vs GEMM floor |" if lin else "memory floor (ms) | time / floor |"
    lines = [f"| provider | N | V | time (ms) | peak extra (MiB) | achieved | {fcols} "
             f"vs {ref} time / memory | predicted (ms) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + ("" if lin else " --- |")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['N']} | {r['V']} | error: {r['error'][:60]} "
                         "| | | | |" + (" |" if lin else " | |"))
            continue
        t = r["time_s"]
        if r.get("flops"):
            rate = r["flops"] / t
            ach = f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
        else:
            ach = f"{r['bytes_moved'] / t / 1e9:.1f} GB/s ({100 * r['bytes_moved'] / t / ceiling:.0f}%)"
        b = base.get((r["N"], r["V"]))
        rel = ""
        if b is not None:
            mem = 100 * r["peak_extra_bytes"] / max(b["peak_extra_bytes"], 1)
            rel = f"{100 * t / b['time_s']:.1f}% / {mem:.2f}%"
        pred = f"{r['predicted_ms']:.2f} (x{r['measured_over_predicted']:.2f})" \
            if r.get("predicted_ms") else ""
        if lin:
            fl = f"{r['vs_gemm_floor']:.3f}x" if r.get("vs_gemm_floor") else ""
        else:
            floor = r["bytes_moved"] / ceiling if r.get("bytes_moved") else 0.0
            fl = f"{floor * 1e3:.2f} | {t / floor:.2f}x" if floor else " | "
        lines.append(f"| {r['provider']} | {r['N']} | {r['V']} | {t * 1e3:.2f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} | {ach} | {fl} | {rel} | {pred} |")
    if cfg["op"] == "topk":  # the stored teacher's size, next to the loss's cost
        lines[0] += " teacher on disk (B/token) |"
        lines[1] += " --- |"
        for i, r in enumerate(rows, 2):
            lines[i] += f" {r.get('disk_bytes_per_token', 0):.0f} |"
    return "\n".join(lines)


CSV_KEYS = ["op", "provider", "divergence", "dtype", "N", "V", "D", "hard_weight", "time_s",
            "peak_extra_bytes", "bytes_moved", "flops", "predicted_ms",
            "measured_over_predicted", "vs_gemm_floor", "error", "disk_bytes_per_token"]


def start_csv(f, env, cfg, ceiling):
    """Writes the comment line and the header; returns the writer for one row per point."""
    f.write(f"# {env} op={cfg['op']} dtype={cfg['dtype']} copy_bandwidth={ceiling:.4g}\n")
    w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
    w.writeheader()
    f.flush()
    return w


def csv_row(r, cfg):
    row = dict(r, op=cfg["op"], divergence=cfg["divergence"] if cfg["op"] != "feature" else
               "mse", dtype=cfg["dtype"], D=cfg["D"] if cfg["op"] != "distill" else "",
               hard_weight=cfg["hard_weight"])
    return {k: row.get(k, "") for k in CSV_KEYS}


def plot(rows, env, cfg, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return []
    paths = []
    for metric, label, scale in (("time_s", "time (ms)", 1e3),
                                 ("peak_extra_bytes", "peak extra memory (MiB)", 1 / 2**20)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov in dict.fromkeys(r["provider"] for r in rows):
            for v in dict.fromkeys(r["V"] for r in rows):
                pts = sorted((r["N"], r[metric] * scale) for r in rows
                             if r["provider"] == prov and r["V"] == v and "error" not in r)
                if pts:
                    lab = prov if cfg["op"] == "feature" else f"{prov} V={v}"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        if metric == "time_s":
            ax.set_yscale("log")
        ax.set_title(f"{cfg['op']} {cfg['dtype']} | {env['device']}\n"
                     f"{env['date']} torch {env['torch']} commit {env['commit']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out, f"{cfg['op']}_{metric.split('_')[0]}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
