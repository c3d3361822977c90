"""Task-specific distillation: a teacher classifier distilled into a smaller student.

The task is built in: given one line of Python source, tell which of twelve standard-library
modules it comes from (hashed character-trigram features). A wide teacher MLP is trained on all
training lines. Two identical small students then see the labels of only 10% of the training
lines (the usual situation when a deployed model is distilled: labels are scarce, teacher
predictions are cheap): one learns from those labels alone, the other also from the teacher's
temperature-softened predictions on all training lines (their labels unused) through
fd.distill_loss. Accuracies on held-out lines are printed.

    python examples/classifier_distillation.py        # about a minute on 2 CPU cores
"""

import os
import time
import zlib

import torch
import torch.nn.functional as F
from torch import nn

import fastdistill as fd

MODULES = ["argparse", "asyncio/base_events", "collections/__init__", "dataclasses", "email/message",
           "inspect", "json/decoder", "logging/__init__", "pathlib", "subprocess", "typing",
           "unittest/case"]
BUCKETS = 4096


def load_lines():
    root = os.path.dirname(os.__file__)
    lines, labels = [], []
    for k, mod in enumerate(MODULES):
        path = os.path.join(root, mod + ".py")
        if not os.path.exists(path):  # layouts differ across Python versions
            path = os.path.join(root, mod.split("/")[0], "__init__.py")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                s = line.strip()
                if len(s) >= 12 and not s.startswith("#"):
                    lines.append(s)
                    labels.append(k)
    return lines, torch.tensor(labels)


def featurise(lines):
    """Hashed character trigrams, L2-normalised: [n_lines, BUCKETS] float32."""
    x = torch.zeros(len(lines), BUCKETS)
    for i, s in enumerate(lines):
        s = f"  {s}  "
        idx = [zlib.crc32(s[j:j + 3].encode()) % BUCKETS for j in range(len(s) - 2)]
        x[i].index_add_(0, torch.tensor(idx), torch.ones(len(idx)))
    return F.normalize(x, dim=1)


def mlp(width):
    return nn.Sequential(nn.Linear(BUCKETS, width), nn.ReLU(), nn.Linear(width, len(MODULES)))


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, steps, loss_fn, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = loss_fn(model, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main():
    t0 = time.time()
    torch.manual_seed(0)
    lines, y = load_lines()
    x = featurise(lines)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 5
    val, tr = perm[:n_val], perm[n_val:]
    labeled = tr[: len(tr) // 10]
    print(f"{len(y)} lines from {len(MODULES)} modules: {len(tr)} train ({len(labeled)} with "
          f"labels for the students), {n_val} held out")

    def supervised(rows, batch):
        def loss(model, g):
            i = rows[torch.randint(0, len(rows), (batch,), generator=g)]
            return F.cross_entropy(model(x[i]), y[i])
        return loss

    teacher = train(mlp(512), 1200, supervised(tr, 256))
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(x)

    def distilled(model, g):
        j = tr[torch.randint(0, len(tr), (256,), generator=g)]
        soft = fd.distill_loss(model(x[j]), teacher_logits[j], temperature=2.0, t2_scale=True)
        return supervised(labeled, 128)(model, g) + soft

    acc = {}
    for name, fn in (("hard-label", supervised(labeled, 128)), ("distilled", distilled)):
        torch.manual_seed(1)  # identical initial students
        acc[name] = accuracy(train(mlp(16), 800, fn, seed=1), x[val], y[val])
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in mlp(16).parameters())
    print(f"teacher ({n_t / 1e6:.2f}M params) accuracy {accuracy(teacher, x[val], y[val]):.3f}")
    print(f"student ({n_s / 1e3:.0f}k params) accuracy: distilled {acc['distilled']:.3f} | "
          f"hard-label {acc['hard-label']:.3f}")
    print(f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
