"""A small end-to-end distillation run on built-in data (text of the Python standard library):
a character-level teacher is trained briefly, then a smaller student learns from it with
fd.distill_loss (soft targets + hard labels). Prints the losses as they fall."""

import os
import sys
import time

import torch
from torch import nn

import fastdistill as fd


def corpus(max_chars=400_000):
    root = os.path.dirname(os.__file__)
    parts = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="ignore") as f:
                parts.append(f.read())
        if sum(map(len, parts)) > max_chars:
            break
    text = "".join(parts)[:max_chars]
    return bytes(text, "utf-8", errors="ignore")


class CharLM(nn.Module):
    def __init__(self, ctx, dim, hidden, vocab=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(ctx * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.body(self.emb(x).flatten(1)))


def batches(data, ctx, n, gen):
    idx = torch.randint(0, len(data) - ctx - 1, (n,), generator=gen)
    x = torch.stack([data[i:i + ctx] for i in idx.tolist()])
    y = data[idx + ctx]
    return x, y


def main():
    torch.manual_seed(0)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    ctx = 8
    gen = torch.Generator().manual_seed(0)
    teacher = CharLM(ctx, 64, 512)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    t0 = time.time()
    for step in range(400):
        x, y = batches(train, ctx, 256, gen)
        loss = nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"teacher step {step:4d} loss {loss.item():.3f}", flush=True)
    teacher.eval()

    def val_loss(model):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x, y = batches(val, ctx, 4096, g)
            return nn.functional.cross_entropy(model(x), y).item()

    results = {}
    for mode in ("hard-label", "distilled"):
        torch.manual_seed(1)
        student = CharLM(ctx, 16, 64)
        opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(2)
        for step in range(300):
            x, y = batches(train, ctx, 256, g)
            logits = student(x)
            if mode == "distilled":
                with torch.no_grad():
                    tl = teacher(x)
                loss = fd.distill_loss(logits, tl, y, temperature=2.0, t2_scale=True,
                                       soft_weight=0.5, hard_weight=0.5)
            else:
                loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0:
                print(f"{mode} student step {step:4d} loss {loss.item():.3f}", flush=True)
        results[mode] = val_loss(student)
    print(f"distilled: val_loss={results['distilled']:.4f} "
          f"hard-label: val_loss={results['hard-label']:.4f} teacher: val_loss={val_loss(teacher):.4f}")
    print(f"time {time.time() - t0:.1f}s | backends: {fd.backends.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
