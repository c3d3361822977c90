"""Peak memory of one distillation loss step (forward + backward): TRL's chunked loss
(trl.trainer.distillation_trainer._chunked_divergence_loss, what trl.DistillationTrainer runs),
fastdistill's fused step (fastdistill.integrations.trl, what its DistillationTrainer runs) and
the full-logits generalized JSD of TRL's GKD / GOLD trainers.

Each method runs once in a fresh process on the same inputs (hidden states, lm_head weights,
a token mask); on CUDA the figure is torch.cuda.max_memory_allocated beyond the inputs, on CPU
the process's peak resident memory beyond what it held before the step. Prints a table; the
loss values agree to float32 rounding.

    python bench/trl_memory.py                       # N=2048 tokens, V=32768, D=128
    python bench/trl_memory.py --N 4096 --V 65536 --D 256 --device cuda --dtype bfloat16
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("trl_chunked", "fastdistill", "trl_full_logits")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a):
    import torch
    torch.manual_seed(0)
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    h_s = (torch.randn(a.N, a.D, device=dev) * 0.5).to(dt).requires_grad_()
    w_s = (torch.randn(a.V, a.D, device=dev) * 0.1).to(dt).requires_grad_()
    h_t = (torch.randn(a.N, a.D, device=dev) * 0.5).to(dt)
    w_t = (torch.randn(a.V, a.D, device=dev) * 0.2).to(dt)
    mask = torch.rand(a.N, device=dev) < 0.9
    if a.method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        run = lambda: _chunked_divergence_loss(h_s[None], h_t[None], w_s, w_t, mask[None],  # noqa
                                               a.beta, temperature=a.temperature)[0]
    elif a.method == "fastdistill":
        from fastdistill.integrations._common import divergence_for_beta
        from fastdistill.linear import linear_distill_loss
        run = lambda: linear_distill_loss(h_s, w_s, h_t, w_t, mask=mask,  # noqa
                                          temperature=a.temperature, **divergence_for_beta(a.beta))
    else:
        from trl.experimental.gkd import GKDTrainer

        def run():
            zs, zt = h_s @ w_s.t(), h_t @ w_t.t()
            lab = torch.where(mask, 0, -100)
            return GKDTrainer.generalized_jsd_loss(zs, zt, lab, beta=a.beta,
                                                   temperature=a.temperature)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    t0 = time.perf_counter()
    loss = run()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"method": a.method, "loss": float(loss), "seconds": time.perf_counter() - t0,
                      "peak_extra_mib": peak / 2**20}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.method:
        return child(a)
    print(f"one loss step, forward + backward: N={a.N} tokens, V={a.V}, D={a.D}, beta={a.beta}, "
          f"{a.dtype} on {a.device}")
    print(f"{'method':<18}{'peak extra MiB':>16}{'seconds':>10}{'loss':>14}")
    for m in a.methods:
        cmd = [sys.executable, __file__, "--method", m] + [
            x for k in ("N", "V", "D", "beta", "temperature", "device", "dtype")
            for x in (f"--{k}", str(getattr(a, k)))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode
            print(f"{m:<18} failed: {why}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{m:<18}{res['peak_extra_mib']:>16.1f}{res['seconds']:>10.2f}{res['loss']:>14.6f}")


if __name__ == "__main__":
    main()
