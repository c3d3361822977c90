"""The distillation demo: ``python -m fastdistill.demo`` (``make demo``).

On built-in data only (the Python standard library's own sources, no download):
  1. trains a byte-level BPE tokenizer on the fly,
  2. trains a small teacher transformer language model briefly,
  3. trains identical small students for the same number of steps and the same batches:
     one on hard labels only (cross-entropy), one with fd.linear_distill_loss (soft targets
     from the teacher + hard labels, straight from the hidden states: no logits materialised),
     and one offline: the teacher's top-k distributions of those batches are extracted once
     to disk (fd.offline.extract_topk) and the student learns from the stored top-k
     (teacher_topk=, topk_tail="bucket") without the teacher in the loop,
  4. reports held-out validation loss (cross-entropy on the next token) of all of them, a plot of
     the validation curves, the time and peak memory of the loss against the naive one at this
     vocabulary, and the parameter counts and generation speed of teacher and student.

Runs in a few minutes on 2 CPU cores; uses a GPU when there is one.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fastdistill as fd
from fastdistill.demo.bpe import BPE
from fastdistill.demo.model import TinyLM


# ---- data -----------------------------------------------------------------------------------------

def stdlib_files():
    root = os.path.dirname(os.__file__)
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".py")]


def corpus(max_chars: int):
    """Train and held-out text: every 10th standard-library module is held out."""
    train, val = [], []
    n_train = n_val = 0
    for i, path in enumerate(stdlib_files()):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if i % 10 == 9:
            if n_val < max_chars // 9:
                val.append(text)
                n_val += len(text)
        elif n_train < max_chars:
            train.append(text)
            n_train += len(text)
    return "\n".join(train), "\n".join(val)


def batch(data: torch.Tensor, B: int, T: int, gen: torch.Generator, device):
    i = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
    x = torch.stack([data[j:j + T] for j in i.tolist()])
    y = torch.stack([data[j + 1:j + T + 1] for j in i.tolist()])
    return x.to(device), y.to(device)


# ---- training -------------------------------------------------------------------------------------

@torch.no_grad()
def val_loss(model, val: torch.Tensor, cfg, device) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)  # the same held-out batches for every model
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = batch(val, cfg.batch, cfg.context, g, device)
        total += F.cross_entropy(model.logits(x).flatten(0, 1).float(), y.flatten()).item()
    model.train()
    return total / cfg.eval_batches


def lr_at(step, steps, base, warmup=20):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model, train_data, val_data, cfg, device, steps, lr, desc, loss_fn, curve=True):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(42)  # both students see the same batches
    want_curve, points = curve, []
    # a bar on a terminal; nothing when the output is a log file (disable=None)
    bar = tqdm(total=steps, desc=desc, disable=None, dynamic_ncols=True)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x, y = batch(train_data, cfg.batch, cfg.context, gen, device)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if want_curve and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
            points.append((step + 1, val_loss(model, val_data, cfg, device)))
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update()
    bar.close()
    return points


def hard_label_loss(model, x, y):
    h = model(x)
    return F.cross_entropy((h @ model.lm_head_weight.t()).flatten(0, 1), y.flatten())


def distill_loss_fn(teacher, cfg):
    def fn(model, x, y):
        with torch.no_grad():
            h_t = teacher(x)
        return fd.linear_distill_loss(model(x), model.lm_head_weight, h_t,
                                      teacher.lm_head_weight, y, divergence=cfg.divergence,
                                      temperature=cfg.temperature, t2_scale=True,
                                      soft_weight=cfg.soft_weight,
                                      hard_weight=1.0 - cfg.soft_weight)
    return fn


def student_batches(train_data, cfg, device, steps):
    """The students' batches, in training order (train() draws them with the same seed)."""
    gen = torch.Generator().manual_seed(42)
    for _ in range(steps):
        yield batch(train_data, cfg.batch, cfg.context, gen, device)[0]


def offline_loss_fn(topk_dir, cfg):
    """The loss of the student trained from stored top-k: the stored batches come back in the
    order they were extracted, i.e. aligned with the training batches."""
    stored = fd.offline.iter_batches(topk_dir, cfg.batch)

    def fn(model, x, y):
        b = next(stored)
        if not torch.equal(b["input_ids"], x.cpu()):
            raise RuntimeError("stored top-k batches are out of step with the training batches")
        return fd.linear_distill_loss(model(x), model.lm_head_weight, None, None, y,
                                      teacher_topk=(b["indices"].to(x.device),
                                                    b["logprobs"].to(x.device)),
                                      topk_tail="bucket", divergence=cfg.divergence,
                                      temperature=cfg.temperature, t2_scale=True,
                                      soft_weight=cfg.soft_weight,
                                      hard_weight=1.0 - cfg.soft_weight)
    return fn


# ---- measurements ---------------------------------------------------------------------------------

def loss_cost(V, D, N, device, dtype):
    """Time and peak extra memory of fd.linear_distill_loss against the naive loss
    (materialised logits) at the demo's sizes, forward + backward."""
    from fastdistill.bench import cases, measure
    out = {}
    for prov in ("fastdistill-chunked", "torch-eager"):
        spec = dict(op="linear", provider=prov, N=N, V=V, D=D, Dt=D, dtype=dtype, device=device,
                    divergence="forward_kl", temperature=2.0, hard_weight=0.5, soft_weight=0.5,
                    repeats=3)
        if device == "cpu":
            out[prov] = measure.measure_cpu(spec)
        else:
            run, reset, grad_bytes, _, _ = cases.build(spec)
            out[prov] = measure.measure_cuda(run, reset, grad_bytes)
    return out


@torch.no_grad()
def tokens_per_second(model, tok: BPE, device, steps=64):
    model.eval()
    prompt = torch.tensor([tok.encode("def ")], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    model.generate(prompt, 4, generator=g)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompt, steps, generator=g)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    model.train()
    return steps / dt, tok.decode(out[0].tolist())


def plot(curves, teacher_val, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=f"{name} student")
    ax.axhline(teacher_val, color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m fastdistill.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--chars", type=int, default=3_000_000, help="training text size")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=500)
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--soft-weight", type=float, default=0.7)
    ap.add_argument("--topk", type=int, default=32,
                    help="entries per token of the stored teacher (offline student)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    cfg = parse(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" \
        else cfg.device
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.time()

    train_text, val_text = corpus(cfg.chars)
    t0 = time.time()
    tok = BPE.train(train_text[:1_000_000], cfg.vocab)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    print(f"corpus: {len(train_text) / 1e6:.1f} MB of standard-library source -> "
          f"{len(train_ids) / 1e6:.2f}M train / {len(val_ids) / 1e3:.0f}k held-out tokens, "
          f"BPE vocabulary {tok.vocab_size} (trained in {time.time() - t0:.1f}s)", flush=True)

    V = tok.vocab_size
    teacher = TinyLM(V, 256, 4, 4, cfg.context).to(device)
    train(teacher, train_ids, val_ids, cfg, device, cfg.teacher_steps, 2e-3, "teacher",
          hard_label_loss, curve=False)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_val = val_loss(teacher, val_ids, cfg, device)

    # the teacher's top-k distributions of the students' batches, once, to disk
    topk_dir = os.path.join(cfg.out, "teacher_topk")
    shutil.rmtree(topk_dir, ignore_errors=True)  # a fresh teacher: nothing to resume
    stored = fd.offline.extract_topk(lambda ids: teacher.logits(ids),
                                     student_batches(train_ids, cfg, device, cfg.student_steps),
                                     cfg.topk, cfg.temperature, topk_dir, tokenizer=tok,
                                     shard_tokens=1 << 16, progress=False)

    curves, students = {}, {}
    runs = (("hard-label", hard_label_loss), ("distilled", distill_loss_fn(teacher, cfg)),
            (f"offline top-{cfg.topk}", offline_loss_fn(topk_dir, cfg)))
    for name, fn in runs:
        torch.manual_seed(cfg.seed + 1)  # identical initial students
        student = TinyLM(V, 96, 2, 4, cfg.context).to(device)
        curves[name] = train(student, train_ids, val_ids, cfg, device, cfg.student_steps, 3e-3,
                             f"{name} student", fn)
        students[name] = student

    final = {k: c[-1][1] for k, c in curves.items()}
    path = os.path.join(cfg.out, "validation_curves.png")
    plot(curves, teacher_val, path,
         f"student {students['distilled'].num_params() / 1e6:.2f}M params, teacher "
         f"{teacher.num_params() / 1e6:.2f}M | {cfg.divergence} T={cfg.temperature} "
         f"soft {cfg.soft_weight} / hard {1 - cfg.soft_weight:.1f}")

    N, D = cfg.batch * cfg.context, 96
    cost = loss_cost(V, D, N, device, "fp32" if device == "cpu" else "bf16")
    t_tok, t_sample = tokens_per_second(teacher, tok, device)
    s_tok, s_sample = tokens_per_second(students["distilled"], tok, device)

    off = f"offline top-{cfg.topk}"
    print(f"distilled: val_loss={final['distilled']:.4f} {off.replace(' ', '-')}: "
          f"val_loss={final[off]:.4f} hard-label: val_loss={final['hard-label']:.4f} teacher: "
          f"val_loss={teacher_val:.4f}")
    print(f"stored teacher: {stored['tokens']} tokens, {stored['bytes'] / 2**20:.1f} MiB, "
          f"{stored['bytes_per_token']:.0f} bytes/token (dense bf16 logits: {2 * V}), extracted "
          f"in {stored['seconds']:.1f}s")
    print(f"plot: {path}")
    ours, naive = cost["fastdistill-chunked"], cost["torch-eager"]
    if "error" not in ours and "error" not in naive:
        print(f"loss at V={V}, {N} tokens, fwd+bwd: fastdistill {ours['time_s'] * 1e3:.1f} ms, "
              f"{ours['peak_extra_bytes'] / 2**20:.1f} MiB extra | naive "
              f"{naive['time_s'] * 1e3:.1f} ms, {naive['peak_extra_bytes'] / 2**20:.1f} MiB extra")
    print(f"teacher: {teacher.num_params() / 1e6:.2f}M params, {t_tok:.0f} tokens/s | student: "
          f"{students['distilled'].num_params() / 1e6:.2f}M params, {s_tok:.0f} tokens/s "
          f"({t_tok and s_tok / t_tok:.1f}x faster, "
          f"{teacher.num_params() / students['distilled'].num_params():.1f}x smaller)")
    print(f"distilled student sample: {s_sample[:120]!r}")
    print(f"device {device} | total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
