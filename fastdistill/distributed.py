"""Distillation beyond one device, on torch.distributed (NCCL on GPU, gloo on CPU).

Three tools:

**Vocabulary-parallel losses** (tensor-parallel lm_head, Megatron-style sharded logits). Each
rank of a group holds a contiguous slice of the vocabulary, in rank order: logits
``[..., Vl]`` or lm_head rows ``[Vl, D]``, either as plain local tensors with ``group=`` or as
DTensors placed ``Shard(-1)`` (logits) / ``Shard(0)`` (weight, bias). The logits are never
gathered. Per chunk of rows:

  pass 1  local row maxima of the student / teacher (/ CE) logits    all-reduce MAX  [R, 2-3]
  pass 2  sums of exp relative to the global maxima, the label's       all-reduce SUM  [R, 2-6]
          logit (held by one rank), and for forward / reverse /
          symmetric KL the divergence itself (its numerator
          sum p (log p - log q) kept relative to the maxima)
  pass 3  jsd, skew_*, tvd: the divergence terms and sum_j q_j h_j,    all-reduce SUM  [R, 2]
          which need both log-sum-exps first

and then every rank writes its own slice of the student gradient, dD/da_j = q_j (h_j - sum_i
q_i h_i) with h = dD/dq, plus the CE gradient on its slice. The loss value is the full
single-device loss on every rank; the logit gradient is the local slice of the full gradient;
the lm_head gradient the local rows. Memory: O(chunk x Vl) float32 temporaries per rank and
[N, k] statistics; communication: 2-3 all-reduces of [chunk, <= 5] float32 per chunk.

The linear loss computes the logits of a chunk of rows from the replicated hidden states and
the local weight rows (float32), runs the passes above, and accumulates grad_weight (local rows,
float32), grad_bias and a partial grad_hidden (this slice's contribution). The hidden states
are replicated, so their gradient is the sum of the partials: it is all-reduced once after the
sweep (one [N, D] all-reduce), giving the full gradient on every rank.

*Composing with a tensor-parallel layer that all-reduces its input gradient itself.* Megatron's
``ColumnParallelLinear`` (its ``copy_to_tensor_model_parallel_region``) and torch's
``ColwiseParallel`` all-reduce the gradient of their replicated input in backward. If the
hidden states reach this loss through such a region (the loss takes the region's output), pass
``reduce_hidden_grad=False``: the loss then returns only its partial (this rank's vocabulary
slice) and the region's all-reduce completes it; leaving the default would all-reduce twice
(group-size times the gradient). With DTensor hidden states (placed ``Replicate()``) the
gradient is returned as a ``Partial()`` DTensor instead, and DTensor reduces it once where it
is needed (e.g. a reduce-scatter when the hidden states were gathered from ``Shard(0)``).

**Sharded weights** (FSDP2, DeepSpeed ZeRO-3): :func:`call_unsharded` runs a loss with the
lm_head of FSDP2 modules gathered, through the modules' own FSDP hooks, so the weight gradient
is reduce-scattered exactly as after a forward of the module.

**Data parallel**: :func:`global_num_items_in_batch` counts the tokens that count over the
data-parallel group (an all-reduce, no host sync) for ``num_items_in_batch``.

The row math here runs in PyTorch operations (any device), eagerly (not inside a
torch.compile region); the single-device fused kernels stream a whole row in one program and
are not used. No host synchronisation happens in the
loss on CUDA tensors; on CPU tensors the ranks' shapes are cross-checked first (one small
all-gather), which on a GPU would synchronise and is skipped.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from fastdistill import _checks
from fastdistill._chunked import default_chunk, mm_f32, tensor_core_path
from fastdistill.config import DistillConfig, KernelOptions
from fastdistill.divergences import FKL, JSD, RKL, SFKL, SKL, SRKL, TVD

__all__ = [
    "vocab_parallel_distill_loss",
    "vocab_parallel_linear_distill_loss",
    "global_num_items_in_batch",
    "call_unsharded",
    "is_vocab_parallel",
]

# float32 elements per [rows, Vl] temporary of the logit-level loss (about fifteen live at
# once): 8 MiB on CPU, 32 MiB on GPUs, where fewer, larger chunks mean fewer all-reduces
CHUNK_ELEMENTS = 1 << 21
CHUNK_ELEMENTS_GPU = 1 << 23
# float32 [chunk, Vl] buffers of the linear loss's chunk (logits, teacher logits, row temporaries)
LINEAR_BUFFERS = 12

_F32 = torch.float32


# ---- DTensor and group plumbing ---------------------------------------------------------------

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without DTensor
    _DTensor = None


def _is_dtensor(x) -> bool:
    return _DTensor is not None and isinstance(x, _DTensor)


def is_vocab_parallel(*tensors, group=None) -> bool:
    """True when a loss over these inputs is vocabulary-parallel: a group is given or one of
    the tensors is a DTensor. The public functions dispatch here on it."""
    return group is not None or any(_is_dtensor(t) for t in tensors if t is not None)


def _resolve_group(group, name="group"):
    """A ProcessGroup (or a 1-D DeviceMesh) -> (group, size, rank in the group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name}: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{name} must be a ProcessGroup or a 1-D DeviceMesh, got a "
                             f"{group.ndim}-D DeviceMesh")
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (or a 1-D DeviceMesh), "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member "
                         "of the group")
    return group, dist.get_world_size(group), rank


def _same_group(g1, g2) -> bool:
    return g1 is g2 or dist.get_process_group_ranks(g1) == dist.get_process_group_ranks(g2)


@dataclass(frozen=True)
class _Slice:
    """This rank's slice of a vocabulary-sharded tensor."""
    local: torch.Tensor
    group: Any
    offset: Optional[int]   # first global column; None for plain tensors (rank * width)
    total: Optional[int]    # global width; None for plain tensors (size * width)


def _placement_str(placements) -> str:
    return "(" + ", ".join(repr(p) for p in placements) + ")"


def _vocab_shard(x, name: str, dim: int, expect: str, grad_to_local: bool = True) -> _Slice:
    """A DTensor sharded along the vocabulary dimension `dim` on exactly one mesh dimension (and
    Replicate on the others) -> its local tensor, the mesh dimension's group, offset, width."""
    from torch.distributed.tensor import Replicate, Shard
    dim = dim % x.dim()
    shard_dims = [i for i, p in enumerate(x.placements)
                  if isinstance(p, Shard) and p.dim % x.dim() == dim]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(x.placements)
                    if i not in shard_dims)
    if len(shard_dims) != 1 or not others_ok or type(x.placements[shard_dims[0]]) is not Shard:
        raise ValueError(f"{name} is a DTensor placed {_placement_str(x.placements)}; a "
                         f"vocabulary-parallel loss needs it placed {expect} on exactly one mesh "
                         "dimension and Replicate() on the others")
    mesh_dim = shard_dims[0]
    mesh = x.device_mesh
    # Shard(d) splits like torch.chunk: pieces of ceil(L / n), the last ones shorter or empty
    total, parts = int(x.shape[dim]), mesh.size(mesh_dim)
    piece = -(-total // parts)
    offset = min(mesh.get_local_rank(mesh_dim) * piece, total)
    local = x.to_local() if grad_to_local else x.to_local().detach()
    if local.shape[dim] != max(0, min(piece, total - offset)):
        raise ValueError(f"{name}: this rank's shard has {local.shape[dim]} of {total} vocabulary "
                         f"entries where Shard({dim}) over {parts} ranks gives "
                         f"{max(0, min(piece, total - offset))}; build it with "
                         "distribute_tensor or DTensor.from_local(..., shape=...) with even "
                         "pieces")
    return _Slice(local, mesh.get_group(mesh_dim), offset, total)


def _replicated(x, name: str, group, grad_partial: bool = False):
    """A DTensor replicated over every mesh dimension -> its local tensor (for the hidden states
    and labels). With grad_partial, its gradient is returned as Partial() on the mesh
    dimension of `group` (the vocabulary-parallel partial sums)."""
    if not _is_dtensor(x):
        return x
    from torch.distributed.tensor import Partial, Replicate
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{name} is a DTensor placed {_placement_str(x.placements)}; a "
                         "vocabulary-parallel loss needs it replicated (Replicate() on every mesh "
                         "dimension): every rank of the vocabulary group sees the same rows. "
                         f"Redistribute it first ({name}.redistribute(placements=[Replicate()]))")
    mesh = x.device_mesh
    if group is not None and not any(_same_group(mesh.get_group(i), group)
                                     for i in range(mesh.ndim)):
        raise ValueError(f"{name} is a DTensor on a mesh that does not contain the vocabulary "
                         "group of the sharded inputs")
    if not grad_partial:
        return x.to_local()
    places = [Partial() if group is not None and _same_group(mesh.get_group(i), group)
              else Replicate() for i in range(mesh.ndim)]
    return x.to_local(grad_placements=places)


# ---- the layout and cross-rank checks ---------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    group: Any
    size: int
    rank: int
    offset: int     # this rank's first global column
    width: int      # this rank's columns (physical)
    total: int      # global columns (physical)
    vocab: int      # the real vocabulary: global columns >= vocab are padding

    @property
    def real(self) -> int:
        """This rank's real columns (those below vocab)."""
        return max(0, min(self.width, self.vocab - self.offset))

    @property
    def uniform_width(self) -> int:
        """A width every rank agrees on (chunk sizes must match across ranks)."""
        return -(-self.total // self.size)


def _layout(s: _Slice, t: _Slice, s_name: str, t_name: str, group, dim: int,
            vocab_size: Optional[int]) -> _Layout:
    """Check the student and teacher slices against each other and the group; the layout."""
    if s.group is not None and group is not None and not _same_group(s.group, group):
        raise ValueError(f"{s_name} is sharded over a different process group than group= "
                         "(the vocabulary group)")
    g = s.group if s.group is not None else t.group if t.group is not None else group
    if g is None:
        raise ValueError("a vocabulary-parallel loss needs group= (the ProcessGroup over which "
                         "the vocabulary is sharded) or DTensor inputs")
    g, size, rank = _resolve_group(g)
    if t.group is not None and not _same_group(t.group, g):
        raise ValueError(f"{t_name} is sharded over a different process group than {s_name}")
    ws, wt = s.local.shape[dim], t.local.shape[dim]
    off_s = s.offset if s.offset is not None else rank * ws
    off_t = t.offset if t.offset is not None else rank * wt
    if (off_s, ws) != (off_t, wt):
        raise ValueError(f"{s_name} and {t_name} must hold the same vocabulary columns on each "
                         f"rank: this rank holds [{off_s}, {off_s + ws}) of {s_name} and "
                         f"[{off_t}, {off_t + wt}) of {t_name} (shard both alike; pad the "
                         "narrower vocabulary and pass vocab_size)")
    tot_s = s.total if s.total is not None else size * ws
    tot_t = t.total if t.total is not None else size * wt
    if vocab_size is None:
        if tot_s != tot_t:
            raise ValueError(f"{s_name} has {tot_s} vocabulary columns in all and {t_name} has "
                             f"{tot_t}; pass vocab_size (the number of real entries) when the "
                             "widths differ")
        vocab = tot_s
    else:
        if not 1 <= vocab_size <= min(tot_s, tot_t):
            raise ValueError(f"vocab_size must be in [1, {min(tot_s, tot_t)}] (the global "
                             f"vocabulary widths: {s_name} {tot_s}, {t_name} {tot_t}), got "
                             f"{vocab_size}")
        vocab = vocab_size
    return _Layout(g, size, rank, off_s, ws, max(tot_s, tot_t), vocab)


def _check_ranks(lay: _Layout, n_rows: int, plain: bool, device: torch.device, what: str):
    """On CPU tensors, all-gather (rows, width, offset) and check that every rank agrees: the
    same rows, and for plain local shards the same width. Raised identically on every rank.
    Skipped on accelerators (reading the result would synchronise with the host)."""
    if device.type != "cpu" or lay.size == 1 or torch.compiler.is_compiling():
        return
    info = torch.tensor([n_rows, lay.width, lay.offset, lay.vocab], dtype=torch.int64)
    got = [torch.empty_like(info) for _ in range(lay.size)]
    dist.all_gather(got, info, group=lay.group)
    rows = [int(x[0]) for x in got]
    widths = [int(x[1]) for x in got]
    if len(set(rows)) != 1:
        raise ValueError(f"{what}: every rank of the vocabulary group must hold the same rows "
                         f"(the hidden states / logits are replicated, only the vocabulary is "
                         f"sharded); rows per rank: {rows}")
    if plain and len(set(widths)) != 1:
        raise ValueError(f"{what}: plain local shards must be equally wide on every rank (the "
                         f"group has {lay.size} ranks), got widths {widths}; pad the vocabulary "
                         "to a multiple of the group size and pass vocab_size, or pass DTensors "
                         "(which may be uneven)")
    if len({int(x[3]) for x in got}) != 1:
        raise ValueError(f"{what}: the ranks disagree on the vocabulary size "
                         f"{[int(x[3]) for x in got]}")


# ---- the row math -----------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _plogr(w, lw, lm):
    """sum_j w_j (lw_j - lm_j), 0 where w_j = 0."""
    keep = w > 0
    zero = w.new_zeros(())
    return torch.where(keep, w * (torch.where(keep, lw, zero) - torch.where(keep, lm, zero)),
                       zero).sum(-1)


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _rows(zs: torch.Tensor, zt: torch.Tensor, lab: Optional[torch.Tensor],
          keep: Optional[torch.Tensor], ko: KernelOptions, hard: bool, lay: _Layout,
          need_grad: bool, grad_scale: torch.Tensor):
    """Loss rows [R] and the gradient w.r.t. zs [R, width] (float32, times grad_scale, zero in
    padding columns and rows that do not count) for one chunk of this rank's slice.

    zs, zt: float32 logits [R, width] of this rank's columns; lab: global label ids [R];
    keep: rows that count [R] bool (None: all)."""
    R, real, dev = zs.shape[0], lay.real, zs.device
    code, beta = ko.divergence, ko.beta
    a = zs[:, :real] * ko.s_mul if ko.s_mul != 1.0 else zs[:, :real]
    b = zt[:, :real] * ko.t_mul if ko.t_mul != 1.0 else zt[:, :real]
    sep_ce = hard and not ko.same_lse
    c = (zs[:, :real] * ko.h_mul if ko.h_mul != 1.0 else zs[:, :real]) if sep_ce else a

    # pass 1: row maxima over the whole vocabulary
    mx = torch.full((R, 3 if sep_ce else 2), -math.inf, dtype=_F32, device=dev)
    if real > 0:
        mx[:, 0], mx[:, 1] = a.amax(-1), b.amax(-1)
        if sep_ce:
            mx[:, 2] = c.amax(-1)
    _all_reduce(mx, dist.ReduceOp.MAX, lay.group)

    # pass 2: sums of exp relative to the maxima, the label's logit, and the KL numerators
    la, lb = a - mx[:, 0:1], b - mx[:, 1:2]
    ea, eb = la.exp(), lb.exp()
    zero = zs.new_zeros(())
    cols = [ea.sum(-1), eb.sum(-1)]
    fkl_col = rkl_col = ce_col = lab_col = None
    if code in (FKL, SKL):
        fkl_col = len(cols)
        cols.append(torch.where(eb > 0, eb * (lb - la), zero).sum(-1))
    if code in (RKL, SKL):
        rkl_col = len(cols)
        cols.append(torch.where(ea > 0, ea * (la - lb), zero).sum(-1))
    lc = c - mx[:, 2:3] if sep_ce else la
    if sep_ce:
        ce_col = len(cols)
        cols.append(lc.exp().sum(-1))
    if hard:
        idx = lab - lay.offset
        here = (idx >= 0) & (idx < real)
        if keep is not None:
            here = here & keep
        safe = torch.where(here, idx, torch.zeros_like(idx)).clamp_(0, max(real - 1, 0))
        lab_col = len(cols)
        if real > 0:
            cols.append(torch.where(here, lc.gather(1, safe[:, None]).squeeze(1), zero))
        else:
            cols.append(torch.zeros(R, dtype=_F32, device=dev))
    S = _all_reduce(torch.stack(cols, -1), dist.ReduceOp.SUM, lay.group)
    log_sa, log_sb = S[:, 0].log(), S[:, 1].log()

    fkl = rkl = None
    if fkl_col is not None:
        fkl = S[:, fkl_col] / S[:, 1] - log_sb + log_sa
    if rkl_col is not None:
        rkl = S[:, rkl_col] / S[:, 0] - log_sa + log_sb
    lq, lp = la - log_sa[:, None], lb - log_sb[:, None]
    q = ea / S[:, 0:1]
    g = None
    if code == FKL:
        div = fkl
        if need_grad:
            g = q - eb / S[:, 1:2]
    elif code == RKL:
        div = rkl
        if need_grad:
            g = torch.where(q == 0, zero, q * (lq - lp - rkl[:, None]))
    elif code == SKL:
        div = beta * fkl + (1 - beta) * rkl
        if need_grad:
            g = beta * (q - eb / S[:, 1:2]) + (1 - beta) * torch.where(
                q == 0, zero, q * (lq - lp - rkl[:, None]))
    else:
        # pass 3: the divergence terms and sum_j q_j h_j need both log-sum-exps first
        p = lp.exp()
        if code == JSD:
            lm = torch.logaddexp(lp + _log_weight(beta), lq + _log_weight(1 - beta))
            d = beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
            h = torch.where(q > 0, (1 - beta) * (lq - lm), zero)
        elif code == SFKL:
            lm = torch.logaddexp(lp + _log_weight(beta), lq + _log_weight(1 - beta))
            d = _plogr(p, lp, lm)
            h = torch.where(p > 0, -(1 - beta) * torch.exp(torch.where(p > 0, lp - lm, zero)),
                            zero)
        elif code == SRKL:
            lm = torch.logaddexp(lp + _log_weight(1 - beta), lq + _log_weight(beta))
            d = _plogr(q, lq, lm)
            safe_l = torch.where(q > 0, lq - lm, zero)
            h = torch.where(q > 0, safe_l - beta * torch.exp(safe_l), zero)
        elif code == TVD:
            d = 0.5 * (p - q).abs().sum(-1)
            h = 0.5 * torch.sign(q - p)
        else:
            raise ValueError(f"unknown divergence code {code}")
        T3 = _all_reduce(torch.stack([d, (q * h).sum(-1)], -1), dist.ReduceOp.SUM, lay.group)
        div = T3[:, 0]
        if need_grad:
            g = torch.where(q == 0, zero, q * (h - T3[:, 1:2]))  # NaN rows stay NaN

    loss = ko.soft_scale * div
    bad = None
    if hard:
        log_sc = S[:, ce_col].log() if sep_ce else log_sa
        ce = log_sc - S[:, lab_col]
        # a label outside [0, V): NaN loss and a zero gradient row, as on the other backends
        bad = (lab < 0) | (lab >= lay.vocab)
        ce = torch.where(bad, torch.full_like(ce, math.nan), ce)
        loss = loss + ko.hard_weight * ce
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, None

    G = torch.zeros(R, zs.shape[1], dtype=_F32, device=dev)
    if real > 0:
        Gr = G[:, :real]
        torch.mul(g, ko.soft_scale * ko.s_mul, out=Gr)
        if hard:
            pc = (lc - log_sc[:, None]).exp_()
            pc.scatter_add_(1, safe[:, None], -here.to(_F32)[:, None])
            Gr.add_(pc, alpha=ko.hard_weight * ko.h_mul)
        Gr.mul_(grad_scale)
        rows_ok = keep
        if bad is not None:
            rows_ok = ~bad if rows_ok is None else rows_ok & ~bad
        if rows_ok is not None:
            Gr.masked_fill_(~rows_ok[:, None], 0.0)
    return loss, G


def _reduction_scale(reduction: str, keep: Optional[torch.Tensor], n_rows: int, batch: int,
                     num_items, device) -> torch.Tensor:
    """0-d float32 factor from summed rows to the reduced loss, on the device."""
    one = torch.ones((), dtype=_F32, device=device)
    if reduction in ("sum", "none"):
        return one
    if reduction == "mean" and num_items is not None:
        if isinstance(num_items, torch.Tensor):
            n = num_items.reshape(()).to(device=device, dtype=_F32)
            # no host sync on a device tensor: a value that is not finite and > 0 gives NaN
            return torch.where(torch.isfinite(n) & (n > 0), 1.0 / n, one * math.nan)
        return one / float(num_items)
    if keep is not None:
        return 1.0 / keep.sum().clamp_min(1).to(_F32)
    return one / float(max(batch if reduction == "batchmean" else n_rows, 1))


def _scale_(grad: Optional[torch.Tensor], g_out: torch.Tensor) -> Optional[torch.Tensor]:
    """grad *= g_out in place (per row when g_out is [N]); skipped when g_out is exactly 1 on
    CPU, where reading the value costs nothing."""
    if grad is None or grad.numel() == 0:
        return grad
    f = g_out.to(grad.dtype)
    if f.dim() > 0:
        f = f.reshape(-1, *([1] * (grad.dim() - 1)))
    elif f.device.type == "cpu" and float(f) == 1.0:
        return grad
    return grad.mul_(f)


# ---- the logit-level loss ---------------------------------------------------------------------

@dataclass
class _LogitProblem:
    lab: Optional[torch.Tensor]
    keep: Optional[torch.Tensor]
    ko: KernelOptions
    hard: bool
    lay: _Layout


def _logit_sweep(student, teacher, P: _LogitProblem, need_grad: bool, grad_scale):
    N, W = student.shape
    rows = torch.empty(N, dtype=_F32, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad \
        else None
    elements = CHUNK_ELEMENTS if student.device.type == "cpu" else CHUNK_ELEMENTS_GPU
    step = max(1, elements // max(P.lay.uniform_width, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        lab = P.lab[r0:r1] if P.lab is not None else None
        keep = P.keep[r0:r1] if P.keep is not None else None
        loss, G = _rows(student[r0:r1].float(), teacher[r0:r1].float(), lab, keep, P.ko, P.hard,
                        P.lay, need_grad, grad_scale)
        rows[r0:r1] = loss
        if need_grad:
            grad[r0:r1] = G
    return rows, grad


class _VocabParallelDistill(torch.autograd.Function):
    """Loss over vocabulary-sharded logits; the student gradient slice is computed in the
    forward and scaled by grad_output in backward (one backward per forward)."""

    @staticmethod
    def forward(ctx, student, teacher, problem, scale, per_row, need_grad):
        rows, grad = _logit_sweep(student, teacher, problem, need_grad,
                                  torch.ones((), dtype=_F32, device=student.device)
                                  if per_row else scale)
        ctx.grad, ctx.per_row = grad, per_row
        return rows if per_row else rows.sum() * scale

    @staticmethod
    def backward(ctx, g_out):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("fastdistill: backward ran twice through one forward, or the "
                               "forward ran without the student gradient (grad mode was off or "
                               "the student did not require grad)")
        return _scale_(grad, g_out), None, None, None, None, None


def _keep_rows(lab, mask, ignore_index):
    keep = None
    if lab is not None:
        keep = lab != ignore_index
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def _check_mask(mask, lead) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != lead:
        raise ValueError(f"mask must have the leading shape {tuple(lead)}, got "
                         f"{tuple(mask.shape)}")
    return mask.reshape(-1)


def _eager(what: str) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{what} runs eagerly (collectives inside an autograd function); "
                           "call it outside the torch.compile region")


def _check_cfg(cfg) -> DistillConfig:
    if cfg is None:
        return DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a fastdistill DistillConfig, got {type(cfg).__name__}")
    return cfg


def _shift_rows(x, logits: bool):
    if x is None:
        return None
    if x.dim() < (2 if logits else 1) or x.shape[-2 if logits else -1] < 1:
        raise ValueError("shift_labels=True needs a sequence dimension of at least one token, "
                         f"got shape {tuple(x.shape)}")
    return x[..., :-1, :] if logits else x[..., 1:]


def _plain_slice(x, name, dim, expect):
    if _is_dtensor(x):
        return _vocab_shard(x, name, dim, expect)
    return _Slice(x, None, None, None)


def vocab_parallel_distill_loss(student_logits, teacher_logits, labels=None, mask=None,
                                cfg: Optional[DistillConfig] = None, num_items_in_batch=None,
                                group=None) -> torch.Tensor:
    """``distill_loss`` over logits sharded along the vocabulary.

    Args:
        student_logits: this rank's slice ``[..., Vl]`` of the student logits (receives the
            gradient of that slice), or a DTensor placed ``Shard(-1)``.
        teacher_logits: the teacher's slice ``[..., Vl]`` (the same columns), or a DTensor
            placed ``Shard(-1)`` alike. No gradient.
        labels: ``[...]`` int64 global token ids, the same on every rank (or a replicated
            DTensor). The label's logit may live on any rank's slice.
        mask: ``[...]`` bool, True = the token counts, the same on every rank.
        cfg: the options (a validated :class:`fastdistill.DistillConfig`); the softcaps do not
            apply at the logit level.
        num_items_in_batch: with ``reduction="mean"``, the divisor (number or tensor; see
            :func:`global_num_items_in_batch`).
        group: the ProcessGroup of the vocabulary shards, each rank holding a contiguous,
            equally wide slice in rank order (``vocab_size`` marks padding, which may sit on the
            last ranks); derived from DTensor inputs when omitted.

    Returns:
        The float32 loss of the whole vocabulary, the same on every rank: 0-d, or the leading
        shape for ``reduction="none"``.
    """
    _eager("vocab_parallel_distill_loss")
    cfg = _check_cfg(cfg)
    s_sl = _plain_slice(student_logits, "student_logits", -1, "Shard(-1)")
    t_sl = _plain_slice(teacher_logits, "teacher_logits", -1, "Shard(-1)")
    student, teacher = s_sl.local, t_sl.local.detach()
    g = s_sl.group if s_sl.group is not None else t_sl.group
    labels = _replicated(labels, "labels", g)
    mask = _replicated(mask, "mask", g)
    _checks.tensor("student_logits", student)
    _checks.tensor("teacher_logits", teacher)
    batch = student.shape[0]
    if cfg.shift_labels:
        student, teacher = _shift_rows(student, True), _shift_rows(teacher, True)
        labels, mask = _shift_rows(labels, False), _shift_rows(mask, False)
    lead = student.shape[:-1]
    _checks.leading("teacher_logits", teacher, lead, "student_logits")
    lab = _checks.labels(labels, lead) if labels is not None else None
    m = _check_mask(mask, lead)
    device = _checks.same_device(("student_logits", "teacher_logits", "labels", "mask"),
                                 (student, teacher, lab, m))
    lay = _layout(s_sl, t_sl, "student_logits", "teacher_logits", group, -1, cfg.vocab_size)
    _check_ranks(lay, int(math.prod(lead)), s_sl.offset is None, device,
                 "vocab_parallel_distill_loss")
    hard = cfg.hard_weight > 0
    if hard and lab is None:
        raise ValueError("hard_weight > 0 needs labels (the hard loss is CE against labels)")
    if hard:
        _checks.label_range(lab, lay.vocab, cfg.ignore_index)
    n_items = _checks.num_items(num_items_in_batch, cfg.reduction)

    s2, t2 = _checks.rows2d(student), _checks.rows2d(teacher)
    keep = _keep_rows(lab, m, cfg.ignore_index)
    scale = _reduction_scale(cfg.reduction, keep, s2.shape[0], batch, n_items, device)
    per_row = cfg.reduction == "none"
    need_grad = torch.is_grad_enabled() and student.requires_grad
    problem = _LogitProblem(lab, keep, cfg.kernel_options(), hard, lay)
    loss = _VocabParallelDistill.apply(s2, t2, problem, scale, per_row, need_grad)
    return loss.reshape(lead) if per_row else loss


# ---- the linear loss --------------------------------------------------------------------------

@dataclass
class _LinearProblem:
    h_t: Optional[torch.Tensor]
    w_t: Optional[torch.Tensor]
    b_t: Optional[torch.Tensor]
    t_logits: Optional[torch.Tensor]
    s_scale: Optional[float]
    t_scale: Optional[float]
    s_cap: Optional[float]
    t_cap: Optional[float]
    logit: _LogitProblem
    chunk: int
    reduce_hidden: bool


def _teacher_chunk(P: _LinearProblem, w_t, r0: int, r1: int) -> torch.Tensor:
    if P.t_logits is not None:
        z = P.t_logits[r0:r1].to(_F32, copy=True)
    else:
        h = P.h_t[r0:r1]
        z = mm_f32(h if w_t.dtype != _F32 else h.float(), w_t.t())
        if P.b_t is not None:
            z += P.b_t.float()
    if P.t_scale is not None:
        z.mul_(P.t_scale)
    if P.t_cap is not None:
        z.div_(P.t_cap).tanh_().mul_(P.t_cap)
    return z


def _linear_sweep(hidden, weight, bias, P: _LinearProblem, needs, scale, row_factor, rows_out):
    """One sweep over the row chunks: fills rows_out (if given); returns [grad_hidden (float32,
    all-reduced unless told not to), grad_weight (float32), grad_bias (float32)]."""
    N = hidden.shape[0]
    L = P.logit
    want = any(needs)
    dev = hidden.device
    g_h = torch.zeros(hidden.shape, dtype=_F32, device=dev) if needs[0] else None
    g_w = torch.zeros(weight.shape, dtype=_F32, device=dev) if needs[1] else None
    g_b = torch.zeros(bias.shape, dtype=_F32, device=dev) \
        if bias is not None and needs[2] else None
    b = bias.float() if bias is not None else None
    tc = tensor_core_path(weight)
    w = weight if tc else weight.float()  # one float32 copy per sweep on the upcast path
    w_t = None
    if P.w_t is not None:
        w_t = P.w_t if tensor_core_path(P.w_t) else P.w_t.float()
    for r0 in range(0, N, P.chunk):
        r1 = min(N, r0 + P.chunk)
        h = hidden[r0:r1] if tc else hidden[r0:r1].float()
        z = mm_f32(h, w.t())
        if b is not None:
            z += b
        if P.s_scale is not None:
            z.mul_(P.s_scale)
        th = None
        if P.s_cap is not None:
            th = z.div_(P.s_cap).tanh_()
            z = th * P.s_cap
        zt = _teacher_chunk(P, w_t, r0, r1)
        lab = L.lab[r0:r1] if L.lab is not None else None
        keep = L.keep[r0:r1] if L.keep is not None else None
        rows, G = _rows(z, zt, lab, keep, L.ko, L.hard, L.lay, want, scale)
        if rows_out is not None:
            rows_out[r0:r1] = rows
        if not want:
            continue
        if row_factor is not None:
            G.mul_(row_factor[r0:r1, None])
        if th is not None:
            G.mul_(1.0 - th * th)
        if P.s_scale is not None:
            G.mul_(P.s_scale)
        Gm = G.to(w.dtype) if tc else G
        if g_h is not None:
            g_h[r0:r1] = mm_f32(Gm, w)
        if g_w is not None:
            g_w += mm_f32(Gm.t(), h)
        if g_b is not None:
            g_b += G.sum(0)
    if g_h is not None and P.reduce_hidden and L.lay.size > 1:
        dist.all_reduce(g_h, op=dist.ReduceOp.SUM, group=L.lay.group)
    return [g_h, g_w, g_b]


class _VocabParallelLinear(torch.autograd.Function):
    """Chunked lm_head + vocabulary-parallel loss. Scalar reductions: gradients complete after
    the forward, backward scales them. reduction="none": the forward computes the rows only and
    backward recomputes the chunks with the per-row factors (its collectives included)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem, scale, per_row):
        needs = ctx.needs_input_grad[:3]
        ctx.problem, ctx.per_row, ctx.scale = problem, per_row, scale
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        rows = torch.empty(hidden.shape[0], dtype=_F32, device=hidden.device)
        if per_row:
            _linear_sweep(hidden, weight, bias, problem, (False,) * 3, scale, None, rows)
            ctx.save_for_backward(hidden, weight, bias)
            ctx.grads = None
            return rows
        ctx.grads = _linear_sweep(hidden, weight, bias, problem, needs, scale, None, rows) \
            if any(needs) else None
        return rows.sum() * scale

    @staticmethod
    def backward(ctx, g_out):
        needs = ctx.needs_input_grad[:3]
        if ctx.per_row:
            hidden, weight, bias = ctx.saved_tensors
            one = torch.ones((), dtype=_F32, device=hidden.device)
            grads = _linear_sweep(hidden, weight, bias, ctx.problem, needs, one,
                                  g_out.to(_F32), None)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("fastdistill: backward ran twice through one forward, or the "
                                   "forward ran without gradients")
            grads = [_scale_(g, g_out) for g in grads]
        return tuple(g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes)) \
            + (None, None, None)


def _weight_slice(w, name, d, hidden_name) -> _Slice:
    sl = _plain_slice(w, name, 0, "Shard(0)")
    _checks.tensor(name, sl.local)
    if sl.local.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [Vl, D] slice of the lm_head weight (rows of "
                         f"nn.Linear.weight), got shape {tuple(sl.local.shape)}")
    if sl.local.shape[1] != d:
        raise ValueError(f"{name} has {sl.local.shape[1]} input features but {hidden_name} has "
                         f"{d}; {name} must be [Vl, {d}]")
    return sl


def _bias_slice(bias, name, w: _Slice, w_name) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    sl = _plain_slice(bias, name, 0, "Shard(0)")
    _checks.tensor(name, sl.local)
    if sl.local.dim() != 1 or sl.local.shape[0] != w.local.shape[0]:
        raise ValueError(f"{name} must be this rank's [{w.local.shape[0]}] slice (one value per "
                         f"row of {w_name}), got shape {tuple(sl.local.shape)}")
    if sl.offset is not None and w.offset is not None and sl.offset != w.offset:
        raise ValueError(f"{name} and {w_name} must be sharded alike")
    return sl.local


def vocab_parallel_linear_distill_loss(student_hidden, student_weight, teacher_hidden=None,
                                       teacher_weight=None, labels=None, *, teacher_logits=None,
                                       student_bias=None, teacher_bias=None, mask=None,
                                       cfg: Optional[DistillConfig] = None,
                                       num_items_in_batch=None, group=None,
                                       reduce_hidden_grad: bool = True) -> torch.Tensor:
    """``linear_distill_loss`` with the lm_head sharded along the vocabulary (its rows).

    Args:
        student_hidden: ``[..., Ds]`` hidden states, the same on every rank of the group
            (a plain tensor, or a DTensor replicated on its mesh).
        student_weight: this rank's rows ``[Vl, Ds]`` of the student lm_head, or a DTensor
            placed ``Shard(0)``; receives the gradient of its rows. student_bias ``[Vl]`` alike.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., Dt]``, ``[Vl, Dt]`` (the same
            vocabulary rows), ``[Vl]``; or ``teacher_logits`` ``[..., Vl]`` (this rank's
            columns, or a DTensor placed ``Shard(-1)``). No gradient.
        labels, mask, cfg, num_items_in_batch, group: as in
            :func:`vocab_parallel_distill_loss`; cfg's logit scales and softcaps apply
            (z * scale, then softcap, then 1 / T), ``chunk_size`` sets the rows per chunk.
        reduce_hidden_grad: all-reduce the hidden-state gradient over the group (default),
            giving the full gradient on every rank. False: return this rank's partial (its
            vocabulary slice's contribution), for hidden states that pass through a layer that
            all-reduces its input gradient itself (see the module docstring). Ignored for
            DTensor hidden states, whose gradient is returned as a Partial() DTensor.

    Returns:
        The float32 loss of the whole vocabulary, the same on every rank.
    """
    _eager("vocab_parallel_linear_distill_loss")
    cfg = _check_cfg(cfg)
    if cfg.mode == "fused":
        raise ValueError("mode='fused' is not available with a vocabulary-sharded lm_head; use "
                         "mode='auto' or 'chunked'")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got "
                        f"{type(reduce_hidden_grad).__name__}")
    hidden_is_dt = _is_dtensor(student_hidden)
    _checks.tensor("student_hidden", student_hidden)
    ds = student_hidden.shape[-1]
    s_sl = _weight_slice(student_weight, "student_weight", ds, "student_hidden")
    g0 = s_sl.group
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_weight "
                             "(+ teacher_bias), not both")
        t_sl = _plain_slice(teacher_logits, "teacher_logits", -1, "Shard(-1)")
        t_name, t_dim = "teacher_logits", -1
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is needed: pass teacher_hidden and teacher_weight, or "
                             "teacher_logits")
        _checks.tensor("teacher_hidden", teacher_hidden)
        t_sl = _weight_slice(teacher_weight, "teacher_weight", teacher_hidden.shape[-1],
                             "teacher_hidden")
        t_name, t_dim = "teacher_weight", 0
    for cand in (t_sl.group, group):
        if g0 is None:
            g0 = cand
    if (s_sl.group is not None or t_sl.group is not None) and group is None \
            and not hidden_is_dt:
        raise ValueError("student_weight is a DTensor sharded over the vocabulary but "
                         "student_hidden is a plain tensor: pass student_hidden as a DTensor "
                         "replicated on the same mesh (DTensor.from_local(h, mesh, "
                         "[Replicate()])), or the local shard with group=. (If the weight is "
                         "sharded by FSDP2 over data-parallel ranks, it is not vocabulary-"
                         "parallel: gather it for the loss with "
                         "fastdistill.distributed.call_unsharded.)")
    h_s = _replicated(student_hidden, "student_hidden", g0, grad_partial=True)
    h_t = _replicated(teacher_hidden, "teacher_hidden", g0)
    labels = _replicated(labels, "labels", g0)
    mask = _replicated(mask, "mask", g0)
    w_s = s_sl.local
    b_s = _bias_slice(student_bias, "student_bias", s_sl, "student_weight")
    if t_name == "teacher_weight":
        w_t, t_logits = t_sl.local.detach(), None
        b_t = _bias_slice(teacher_bias, "teacher_bias", t_sl, "teacher_weight")
        b_t = b_t.detach() if b_t is not None else None
    else:
        w_t, b_t, t_logits = None, None, t_sl.local.detach()

    batch = h_s.shape[0] if h_s.dim() > 0 else 1
    if cfg.shift_labels:
        h_s = _shift_rows(h_s, True)
        h_t = _shift_rows(h_t, True) if h_t is not None else None
        t_logits = _shift_rows(t_logits, True) if t_logits is not None else None
        labels, mask = _shift_rows(labels, False), _shift_rows(mask, False)
    lead = h_s.shape[:-1]
    if h_t is not None:
        _checks.leading("teacher_hidden", h_t, lead, "student_hidden")
    if t_logits is not None:
        _checks.tensor("teacher_logits", t_logits)
        _checks.leading("teacher_logits", t_logits, lead, "student_hidden")
    lab = _checks.labels(labels, lead) if labels is not None else None
    m = _check_mask(mask, lead)
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden",
             "teacher_weight", "teacher_bias", "teacher_logits", "labels", "mask")
    device = _checks.same_device(names, (h_s, w_s, b_s, h_t, w_t, b_t, t_logits, lab, m))
    lay = _layout(s_sl, t_sl, "student_weight", t_name, group, 0, cfg.vocab_size) \
        if t_dim == 0 else _layout_mixed(s_sl, t_sl, group, cfg.vocab_size)
    N = int(math.prod(lead))
    _check_ranks(lay, N, s_sl.offset is None, device, "vocab_parallel_linear_distill_loss")
    hard = cfg.hard_weight > 0
    if hard and lab is None:
        raise ValueError("hard_weight > 0 needs labels (the hard loss is CE against labels)")
    if hard:
        _checks.label_range(lab, lay.vocab, cfg.ignore_index)
    n_items = _checks.num_items(num_items_in_batch, cfg.reduction)

    h2 = h_s.reshape(N, ds)
    keep = _keep_rows(lab, m, cfg.ignore_index)
    scale = _reduction_scale(cfg.reduction, keep, N, batch, n_items, device)
    chunk = cfg.chunk_size or default_chunk(max(N, 1), lay.uniform_width, device,
                                            buffers=LINEAR_BUFFERS)
    problem = _LinearProblem(
        h_t.reshape(N, h_t.shape[-1]) if h_t is not None else None, w_t, b_t,
        _checks.rows2d(t_logits) if t_logits is not None else None,
        cfg.student_logit_scale, cfg.teacher_logit_scale, cfg.student_softcap,
        cfg.teacher_softcap,
        _LogitProblem(lab, keep, cfg.kernel_options(fold_logit_scales=False), hard, lay),
        int(chunk), reduce_hidden_grad and not hidden_is_dt)
    per_row = cfg.reduction == "none"
    loss = _VocabParallelLinear.apply(h2, w_s, b_s, problem, scale, per_row)
    return loss.reshape(lead) if per_row else loss


def _layout_mixed(s_sl: _Slice, t_sl: _Slice, group, vocab_size) -> _Layout:
    """Layout of a weight slice [Vl, D] against teacher logits [..., Vl]: the same rules."""
    s = _Slice(s_sl.local.t(), s_sl.group, s_sl.offset, s_sl.total)  # vocabulary last
    return _layout(s, t_sl, "student_weight", "teacher_logits", group, -1, vocab_size)


# ---- data parallel ----------------------------------------------------------------------------

def global_num_items_in_batch(labels: Optional[torch.Tensor] = None, *,
                              mask: Optional[torch.Tensor] = None, ignore_index: int = -100,
                              shift_labels: bool = False, group=None) -> torch.Tensor:
    """The number of tokens that count, summed over a data-parallel group: a 0-d int64 tensor
    on the labels' (or mask's) device, at least 1, for ``num_items_in_batch``.

    A token counts when ``labels != ignore_index`` (and ``mask`` is True, when given);
    ``shift_labels=True`` counts ``labels[..., 1:]`` as the loss does. One all-reduce of one
    element; no host synchronisation (the result stays a device tensor).

    With ``num_items_in_batch`` set to this count, each rank's loss is its token sum divided by
    the global count, so the *sum* over ranks is the global mean. DDP and FSDP2 average
    gradients over the ranks; multiply the loss by the data-parallel world size (as Hugging
    Face's Trainer does) or use FSDP2's ``set_gradient_divide_factor(1.0)`` to get the
    gradient of the global mean.
    """
    if labels is None and mask is None:
        raise ValueError("global_num_items_in_batch needs labels or mask")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    keep = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
            raise TypeError("labels must be an integer tensor")
        keep = (labels[..., 1:] if shift_labels else labels) != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor")
        mk = mask[..., 1:] if shift_labels else mask
        if keep is not None and mk.shape != keep.shape:
            raise ValueError(f"mask must have the labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(mask.shape)}")
        keep = mk if keep is None else keep & mk
    count = keep.sum(dtype=torch.int64)
    if group is not None or (dist.is_available() and dist.is_initialized()):
        g = _resolve_group(group)[0] if group is not None else None
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=g)
    return count.clamp_min(1)


# ---- sharded weights (FSDP2) ------------------------------------------------------------------

def _fsdp_module_cls():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def _trampoline(self, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _through_hooks(module, fn):
    """fn called as a registered FSDP forward method of module (pre-forward all-gather,
    post-forward reshard, backward hooks that reduce-scatter the gradients)."""
    if not getattr(module, "_fastdistill_forward_method", False):
        from torch.distributed.fsdp import register_fsdp_forward_method
        object.__setattr__(module, "_fastdistill_call", types.MethodType(_trampoline, module))
        register_fsdp_forward_method(module, "_fastdistill_call")
        object.__setattr__(module, "_fastdistill_forward_method", True)
    return functools.partial(module._fastdistill_call, fn)


def _unsharded(module, fn):
    """fn called with module's parameters all-gathered (unshard / reshard); for modules that
    get no gradient (a frozen teacher): no backward hooks, no second all-gather."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        module.unshard()
        try:
            return fn(*args, **kwargs)
        finally:
            module.reshard()
    return call


def call_unsharded(modules, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the parameters of FSDP2 modules gathered, e.g. the student's
    and the teacher's lm_head for ``linear_distill_loss``::

        fully_shard(student.lm_head); fully_shard(student)       # likewise the teacher
        loss = call_unsharded(
            [student.lm_head, teacher.lm_head],
            lambda h, ht, y: fd.linear_distill_loss(h, student.lm_head.weight, ht,
                                                    teacher.lm_head.weight, y),
            hidden, teacher_hidden, labels)

    Inside ``fn``, ``module.weight`` is the whole (unsharded) parameter; read it there, not
    before. A module with parameters that require grad is called through its own FSDP hooks
    (``register_fsdp_forward_method``): they all-gather the parameters, reshard after, and hook
    the backward so the gradient of the whole weight is reduce-scattered into the sharded
    ``.grad`` exactly as after the module's forward (gradient division, mixed precision and
    ``set_requires_gradient_sync`` included). Pass the tensors ``fn`` differentiates as
    ``args`` so those hooks see them. A module whose parameters need no gradient (the frozen
    teacher) is unsharded before and resharded after, without backward hooks. Modules that
    are not FSDP modules are called as they are, so one script serves both.

    Memory: for the duration of the loss each gathered module holds its whole parameters
    (``V x D`` in the parameter dtype for an lm_head), and the student also its whole weight
    gradient (``V x D``, the reduce dtype) until the reduce-scatter, plus the loss's own float32
    accumulator (``V x D x 4`` bytes) in the chunked linear loss. With
    ``reshard_after_forward=True`` (the default) the student's lm_head is all-gathered once
    more in backward (FSDP's pre-backward hook), which the loss does not need: set
    ``student.lm_head.set_reshard_after_forward(False)`` to keep it until the gradient is
    reduced instead (memory for one all-gather).

    DeepSpeed ZeRO-3 has no FSDP2 modules; there the weights are gathered around the loss with
    ``deepspeed.zero.GatheredParameters([...])`` instead (see the README; untested here).
    """
    FSDPModule = _fsdp_module_cls()
    mods = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    call = fn
    for mod in reversed(mods):
        if not isinstance(mod, torch.nn.Module):
            raise TypeError(f"modules must be nn.Modules (FSDP2 modules or plain), got "
                            f"{type(mod).__name__}")
        if FSDPModule is None or not isinstance(mod, FSDPModule):
            continue
        wants_grad = any(p.requires_grad for p in mod.parameters())
        call = _through_hooks(mod, call) if wants_grad and torch.is_grad_enabled() \
            else _unsharded(mod, call)
    return call(*args, **kwargs)
