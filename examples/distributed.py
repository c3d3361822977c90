"""Distillation with a tensor-parallel lm_head and an FSDP2 student, on torch.distributed.

    torchrun --standalone --nproc_per_node 2 examples/distributed.py       # CPU (gloo), ~20 s
    torchrun --standalone --nproc_per_node 4 examples/distributed.py --steps 50

Every rank of one mesh plays two roles:

* data parallel: the student's body (embedding, residual MLP blocks, norm) is sharded with
  FSDP2 (``fully_shard``) and each rank trains on its own batch;
* vocabulary parallel: the student's and the teacher's lm_head are split by vocabulary rows
  (DTensors placed ``Shard(0)``), so neither lm_head nor any ``[tokens, vocab]`` logits is ever
  whole on a rank.

For the loss, the ranks' final hidden states (``Shard(0)`` over tokens) are gathered to
``Replicate()`` and ``fd.linear_distill_loss`` (DTensor inputs: the vocabulary-parallel loss)
computes the loss of all tokens over this rank's vocabulary slice, all-reducing only per-token
statistics.
The hidden-state gradient comes back as a ``Partial()`` DTensor, which the gather's backward
reduce-scatters to each rank's own tokens. The loss is the global mean over every token of the
step (the same on every rank), so the FSDP2 body sums its gradients over the ranks instead of
averaging them.

The teacher is exact: the bigram distribution of the synthetic token source, as an lm_head
over a one-hot "hidden state" (logits = log P(next | current)), with a vocabulary of 509 padded
to a multiple of the group size (``vocab_size=509``). The student (a small network) learns it
from the soft labels alone; the printed KL falls towards 0. At step 0 the loss and every
gradient are checked against a single-process float64 computation on all tokens.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import fastdistill as fd
from fastdistill.reference import reference_linear_distill_loss

VOCAB = 509


def markov_chain(vocab: int, seed: int = 0) -> torch.Tensor:
    """A sparse-ish random transition matrix P[current, next] (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * 3.0
    return torch.softmax(logits, -1)


def sample(P: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(batch, seq, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, P.shape[0], (batch,), generator=g)
    for i in range(1, seq):
        tokens[:, i] = torch.multinomial(P[tokens[:, i - 1]], 1, generator=g).squeeze(1)
    return tokens


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def student_body(vocab_padded: int, d: int, layers: int) -> nn.Sequential:
    return nn.Sequential(nn.Embedding(vocab_padded, d), *[Block(d) for _ in range(layers)],
                         nn.LayerNorm(d))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    mesh = init_device_mesh(device.type, (world,))
    vp = -(-VOCAB // world) * world  # padded vocabulary, split evenly over the ranks

    # the teacher: the exact bigram distribution as a one-hot embedding + an lm_head
    P = markov_chain(VOCAB)
    w_teacher = torch.zeros(vp, vp, dtype=torch.float64)  # padding rows: cut by vocab_size
    w_teacher[:VOCAB, :VOCAB] = P.log().t()   # logits[next] = log P(next | current)
    w_teacher = distribute_tensor(w_teacher.to(torch.float32).to(device), mesh, [Shard(0)])

    torch.manual_seed(0)  # the same initial student on every rank
    body = student_body(vp, args.dim, args.layers).to(device)
    lm_head = nn.Linear(args.dim, vp, bias=False).to(device)
    # tensor-parallel lm_head: this rank's vocabulary rows
    lm_head.weight = nn.Parameter(distribute_tensor(lm_head.weight.detach(), mesh, [Shard(0)]))
    init_state = {k: v.detach().clone() for k, v in body.state_dict().items()}
    init_head = lm_head.weight.full_tensor().detach().clone()
    for block in body[1:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(body, mesh=mesh)
    for m in body.modules():  # the loss is the global mean: sum the ranks' gradients
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(list(body.parameters()) + list(lm_head.parameters()), lr=args.lr)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches

    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens = sample(P, args.batch, args.seq, data).to(device)
        h = body(tokens).reshape(-1, args.dim)                       # this rank's tokens
        h_all = DTensor.from_local(h, mesh, [Shard(0)]).redistribute(mesh, [Replicate()])
        teacher_h = nn.functional.one_hot(tokens.reshape(-1), vp).float()
        teacher_all = DTensor.from_local(teacher_h, mesh, [Shard(0)]).redistribute(
            mesh, [Replicate()])
        loss = fd.linear_distill_loss(h_all, lm_head.weight, teacher_all, w_teacher,
                                      divergence="forward_kl", vocab_size=VOCAB)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            check(body, lm_head, init_state, init_head, tokens, w_teacher, args, vp, world, loss,
                  device)
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  KL(teacher || student) per token {loss.item():.4f}",
                  flush=True)
    if rank == 0:
        print(f"{args.steps} steps on {world} ranks ({device.type}) in "
              f"{time.perf_counter() - t0:.1f} s; lm_head rows per rank {vp // world} of {vp}")
    dist.destroy_process_group()


def check(body, lm_head, init_state, init_head, tokens, w_teacher, args, vp, world, loss, device):
    """The step-0 loss and gradients against one process in float64 on every rank's tokens."""
    all_tokens = [torch.empty_like(tokens) for _ in range(world)]
    dist.all_gather(all_tokens, tokens)
    grads = {n: p.grad.full_tensor() for n, p in body.named_parameters()}
    g_head = lm_head.weight.grad.full_tensor()
    w_t = w_teacher.full_tensor()
    if dist.get_rank() != 0:
        return
    ref_body = student_body(vp, args.dim, args.layers).to(device, torch.float64)
    ref_body.load_state_dict({k: v.to(torch.float64) for k, v in init_state.items()})
    head = init_head.to(torch.float64).requires_grad_(True)
    x = torch.cat(all_tokens).reshape(-1)
    h = ref_body(x.reshape(-1, args.seq)).reshape(-1, args.dim)
    ref = reference_linear_distill_loss(
        h, head, nn.functional.one_hot(x, vp).to(torch.float64), w_t.to(torch.float64),
        vocab_size=VOCAB)
    ref.backward()
    err = max([(grads[n].double() - p.grad).abs().max().item()
               for n, p in ref_body.named_parameters()]
              + [(g_head.double() - head.grad).abs().max().item()])
    print(f"step 0 against one process in float64: loss {loss.item():.6f} vs {ref.item():.6f}, "
          f"largest gradient difference {err:.1e}", flush=True)
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item())) and err < 1e-4


if __name__ == "__main__":
    main()
