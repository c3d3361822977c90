"""Vocabulary-parallel losses, FSDP2 lm_head gathering and the data-parallel token count, in
gloo process groups on CPU, against the single-process float64 reference.

One spawn of four processes serves the whole module: every case runs in the group of all four
ranks and, at the same time, in two groups of two ranks ({0, 1} and {2, 3}). Each case builds
the full inputs from a seed (the same on every rank), hands each rank its vocabulary slice,
and compares the loss and this rank's gradients with the float64 reference of the whole
problem. A case's failure is recorded per rank with its traceback and reported by the test of
that case; a case never stops the others.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4
TIMEOUT_S = 240  # the whole spawn; a case that hangs a collective fails after gloo's timeout

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "symmetric_kl")
LOSS_TOL = dict(rtol=2e-5, atol=2e-6)
GRAD_TOL = dict(rtol=2e-4, atol=2e-6)


# ---- helpers used inside the workers ----------------------------------------------------------

class Ctx:
    """The worker's view: the group under test, its size and this rank's position."""

    def __init__(self, group, device):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device


def close(actual, expected, what, tol):
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs " \
                                           f"{tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol,
                               msg=lambda m: f"{what}: {m}")


def dev(ctx, x):
    """x on the device under test (tensors only)."""
    return x.to(ctx.device) if isinstance(x, torch.Tensor) else x


def cols(ctx, width):
    """This rank's contiguous slice of `width` columns split into equal parts."""
    w = width // ctx.size
    return slice(ctx.rank * w, (ctx.rank + 1) * w)


def make_logits(seed, lead, width, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, width, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    t = (torch.randn(*lead, width, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    return s, t


def make_labels(seed, lead, vocab, ctx, ignore=(1,)):
    """Labels in [0, vocab) with some ignored rows; row 0's label lies on the last rank's slice
    and row 2's on the first (so most ranks see labels held elsewhere)."""
    g = torch.Generator().manual_seed(seed + 7)
    lab = torch.randint(0, vocab, lead, generator=g)
    flat = lab.view(-1)
    flat[0] = vocab - 1
    if flat.numel() > 2:
        flat[2] = 0
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    return lab


def reference(s, t, labels=None, grad_out=None, **kw):
    """float64 reference loss and gradient of the full student logits."""
    from fastdistill.reference import reference_distill_loss
    s64 = s.detach().to(torch.float64).requires_grad_(True)
    ref = reference_distill_loss(s64, t.detach().to(torch.float64), labels, **kw)
    if ref.requires_grad:
        ref.backward(torch.ones_like(ref) if grad_out is None else grad_out.to(torch.float64))
    return ref.detach(), (s64.grad if s64.grad is not None else torch.zeros_like(s64))


def cfg_of(kw):
    from fastdistill.config import DistillConfig
    return DistillConfig(**{k: v for k, v in kw.items() if k not in ("mask",
                                                                      "num_items_in_batch")})


def run_logits(ctx, s, t, labels=None, width=None, grad_out=None, public=False, **kw):
    """The vocabulary-parallel loss on this rank's slice against the full reference, called
    directly or (public=True) through fd.distill_loss(..., vocab_group=)."""
    import fastdistill as fd
    from fastdistill.distributed import vocab_parallel_distill_loss
    sl = cols(ctx, s.shape[-1] if width is None else width)
    s_loc = s[..., sl].to(ctx.device).clone().requires_grad_(True)
    if public:
        loss = fd.distill_loss(s_loc, dev(ctx, t[..., sl]), dev(ctx, labels),
                               vocab_group=ctx.group, **{k: dev(ctx, v) for k, v in kw.items()})
    else:
        loss = vocab_parallel_distill_loss(s_loc, dev(ctx, t[..., sl]), dev(ctx, labels),
                                           dev(ctx, kw.get("mask")), cfg_of(kw),
                                           dev(ctx, kw.get("num_items_in_batch")), ctx.group)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss))
    ref, ref_g = reference(s, t, labels, grad_out, **kw)
    if labels is not None:  # ignored rows get a zero gradient (autograd of the reference can
        # leave NaN there when the ignored row holds a NaN)
        keep = labels != kw.get("ignore_index", -100)
        if kw.get("shift_labels"):
            keep = torch.cat([keep[..., 1:], torch.zeros_like(keep[..., :1])], -1)
        ref_g = torch.where(keep[..., None], ref_g, torch.zeros_like(ref_g))
    assert loss.dtype == torch.float32
    close(loss, ref, "loss", LOSS_TOL)
    assert s_loc.grad.dtype == s.dtype
    tol = GRAD_TOL if s.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    close(s_loc.grad, ref_g[..., sl], "student gradient slice", tol)
    return loss


# ---- the cases (run in every worker, in the same order) ---------------------------------------

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def logits_every_divergence(ctx):
    """Every divergence with CE mixing (T != 1), ignored rows, labels on other ranks' slices."""
    for i, div in enumerate(DIVERGENCES):
        s, t = make_logits(10 + i, (7,), 4 * 5)
        lab = make_labels(10 + i, (7,), 20, ctx)
        run_logits(ctx, s, t, lab, divergence=div, beta=0.3, ratio=0.3, temperature=2.0,
                   t2_scale=True, hard_weight=0.4, soft_weight=0.8)


@case
def logits_divergence_endpoints(ctx):
    """beta / ratio at 0 and 1 map to the exact divergences; CE at T = 1 shares the LSE."""
    for i, (div, beta) in enumerate([("jsd", 0.0), ("jsd", 1.0), ("skew_forward_kl", 0.0),
                                     ("skew_forward_kl", 1.0), ("skew_reverse_kl", 0.0),
                                     ("skew_reverse_kl", 1.0), ("symmetric_kl", 0.0),
                                     ("symmetric_kl", 1.0)]):
        s, t = make_logits(30 + i, (5,), 12)
        lab = make_labels(30 + i, (5,), 12, ctx)
        run_logits(ctx, s, t, lab, divergence=div, beta=beta, ratio=beta, hard_weight=0.5)


@case
def logits_reductions(ctx):
    """sum, none (per-row grad_output), batchmean with and without labels, num_items_in_batch
    (number and tensor), mask, and an all-ignored batch (loss 0, no NaN)."""
    s, t = make_logits(50, (2, 4), 16)
    lab = make_labels(50, (2, 4), 16, ctx, ignore=(1, 6))
    go = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    run_logits(ctx, s, t, lab, reduction="sum", divergence="jsd", hard_weight=0.2)
    run_logits(ctx, s, t, lab, reduction="none", divergence="tvd", hard_weight=0.2, grad_out=go)
    run_logits(ctx, s, t, lab, reduction="none", divergence="reverse_kl", grad_out=go)
    run_logits(ctx, s, t, lab, reduction="batchmean", divergence="forward_kl")
    run_logits(ctx, s, t, None, reduction="batchmean", divergence="skew_reverse_kl")
    run_logits(ctx, s, t, lab, num_items_in_batch=11, hard_weight=1.0)
    run_logits(ctx, s, t, lab, num_items_in_batch=torch.tensor(5.0), divergence="jsd")
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    run_logits(ctx, s, t, lab, mask=mask, divergence="symmetric_kl", hard_weight=0.3)
    run_logits(ctx, s, t, None, mask=mask, divergence="skew_forward_kl")
    run_logits(ctx, s, t, torch.full((2, 4), -100), divergence="jsd")
    run_logits(ctx, s, t, None, divergence="tvd")  # no labels, no mask: every row


@case
def logits_scales_padding_shift(ctx):
    """Logit scales (CE on the scaled student at T = 1), a padded vocabulary whose padding
    covers the whole last slice of the 4-rank group, shift_labels on [B, T, V]."""
    s, t = make_logits(60, (6,), 16)
    lab = make_labels(60, (6,), 11, ctx)
    run_logits(ctx, s, t, lab, student_logit_scale=0.7, teacher_logit_scale=1.3,
               temperature=1.5, hard_weight=0.5, divergence="jsd", beta=0.2)
    run_logits(ctx, s, t, lab, vocab_size=11, hard_weight=0.5, divergence="forward_kl")
    run_logits(ctx, s, t, lab, vocab_size=11, hard_weight=0.5, divergence="tvd")
    s3, t3 = make_logits(61, (2, 5), 8)
    lab3 = make_labels(61, (2, 5), 8, ctx)
    run_logits(ctx, s3, t3, lab3, shift_labels=True, hard_weight=0.5, divergence="skew_forward_kl")


@case
def logits_special_values(ctx):
    """-inf logits (masked tokens, one whole slice), +inf KL where supports differ, NaN rows
    (NaN loss and gradient), an all -inf row (NaN), NaN in an ignored row (0)."""
    s, t = make_logits(70, (6,), 8)
    lab = make_labels(70, (6,), 8, ctx, ignore=(5,))
    s[0, :2] = -float("inf")        # some student columns masked (the first slice)
    t[0, :2] = -float("inf")
    t[1, :] = -float("inf")
    t[1, 3] = 0.0                   # teacher one-hot
    s[2, 5] = float("nan")          # NaN in a counted row
    t[3, :] = -float("inf")         # no teacher distribution: NaN
    s[5, 1] = float("nan")          # NaN in an ignored row: 0
    for div in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        run_logits(ctx, s, t, lab, divergence=div, reduction="none")
    s2, t2 = make_logits(71, (3,), 8)
    t2[0, 0] = -float("inf")        # P has no mass where Q has: reverse KL +inf
    s2[1, 0] = -float("inf")        # Q has none where P has: forward KL +inf
    from fastdistill.distributed import vocab_parallel_distill_loss
    from fastdistill.config import DistillConfig
    for div, row in (("forward_kl", 1), ("reverse_kl", 0)):
        sl = cols(ctx, 8)
        out = vocab_parallel_distill_loss(dev(ctx, s2[:, sl]), dev(ctx, t2[:, sl]), None, None,
                                          DistillConfig(divergence=div, reduction="none"),
                                          None, ctx.group)
        assert out[row] == float("inf"), (div, out)
        assert torch.isfinite(out[1 - row]), (div, out)


@case
def logits_bf16(ctx):
    """bfloat16 logits: float32 math, gradient in bfloat16."""
    s, t = make_logits(80, (5,), 12, torch.bfloat16)
    lab = make_labels(80, (5,), 12, ctx)
    run_logits(ctx, s, t, lab, divergence="jsd", hard_weight=0.5, temperature=2.0)


@case
def logits_many_chunks(ctx):
    """More rows than one chunk: the row chunks agree across ranks."""
    import fastdistill.distributed as fdd
    old = fdd.CHUNK_ELEMENTS, fdd.CHUNK_ELEMENTS_GPU
    fdd.CHUNK_ELEMENTS = fdd.CHUNK_ELEMENTS_GPU = 2 * 12 // ctx.size  # 2 rows per chunk
    try:
        s, t = make_logits(85, (9,), 12)
        lab = make_labels(85, (9,), 12, ctx)
        run_logits(ctx, s, t, lab, divergence="skew_reverse_kl", hard_weight=0.3,
                   temperature=3.0)
    finally:
        fdd.CHUNK_ELEMENTS, fdd.CHUNK_ELEMENTS_GPU = old


# ---- linear -----------------------------------------------------------------------------------

def make_linear(seed, N, V, Ds, Dt, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, sc=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * sc
                                ).to(dtype)
    out = dict(h=r(N, Ds), w=r(V, Ds, sc=0.7), ht=r(N, Dt), wt=r(V, Dt, sc=0.7))
    if bias:
        out.update(b=r(V, sc=0.5), bt=r(V, sc=0.5))
    return out


def run_linear(ctx, x, labels=None, grad_out=None, teacher_logits=False, reduce_hidden=True,
               lead=None, public=False, **kw):
    """The vocabulary-parallel linear loss with this rank's lm_head rows against the full
    reference, called directly or (public=True) through fd.linear_distill_loss(...,
    vocab_group=)."""
    import fastdistill as fd
    from fastdistill.distributed import vocab_parallel_linear_distill_loss
    from fastdistill.reference import reference_linear_distill_loss
    V = x["w"].shape[0]
    sl = cols(ctx, V)
    h = x["h"].to(ctx.device).clone().requires_grad_(True)
    w = x["w"][sl].to(ctx.device).clone().requires_grad_(True)
    b = x["b"][sl].to(ctx.device).clone().requires_grad_(True) if "b" in x else None
    caps = {k: kw.pop(k) for k in ("student_softcap", "teacher_softcap", "student_logit_scale",
                                   "teacher_logit_scale") if k in kw}
    cfg = cfg_of({**kw, **caps})
    common = dict(mask=dev(ctx, kw.get("mask")), cfg=cfg, group=ctx.group,
                  num_items_in_batch=dev(ctx, kw.get("num_items_in_batch")),
                  reduce_hidden_grad=reduce_hidden)
    h_in = h.reshape(*lead, -1) if lead else h
    call = vocab_parallel_linear_distill_loss
    if public:
        assert reduce_hidden
        common = dict({k: dev(ctx, v) for k, v in kw.items()}, **caps, vocab_group=ctx.group)
        call = fd.linear_distill_loss
    if teacher_logits:
        from fastdistill.reference import reference_logits
        zt = reference_logits(x["ht"], x["wt"], x.get("bt")).to(x["h"].dtype)
        zt_in = zt.reshape(*lead, -1) if lead else zt
        loss = call(
            h_in, w, None, None, dev(ctx, labels), teacher_logits=dev(ctx, zt_in[..., sl]),
            student_bias=b, **common)
    else:
        ht_in = x["ht"].reshape(*lead, -1) if lead else x["ht"]
        loss = call(
            h_in, w, dev(ctx, ht_in), dev(ctx, x["wt"][sl]), dev(ctx, labels), student_bias=b,
            teacher_bias=dev(ctx, x["bt"][sl]) if "bt" in x else None, **common)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.to(loss))

    h64 = x["h"].to(torch.float64).requires_grad_(True)
    w64 = x["w"].to(torch.float64).requires_grad_(True)
    b64 = x["b"].to(torch.float64).requires_grad_(True) if "b" in x else None
    rkw = {k: v for k, v in kw.items() if k != "chunk_size"}
    t_caps = {k: v for k, v in caps.items() if k.startswith("teacher")}
    s_caps = {k: v for k, v in caps.items() if k.startswith("student")}
    h64_in = h64.reshape(*lead, -1) if lead else h64
    if teacher_logits:
        ref = reference_linear_distill_loss(h64_in, w64, None, None, labels, student_bias=b64,
                                            teacher_logits=zt_in, **s_caps, **t_caps, **rkw)
    else:
        ht64 = x["ht"].to(torch.float64)
        ref = reference_linear_distill_loss(
            h64_in, w64, ht64.reshape(*lead, -1) if lead else ht64, x["wt"], labels,
            student_bias=b64, teacher_bias=x.get("bt"), **s_caps, **t_caps, **rkw)
    ref.backward(torch.ones_like(ref) if grad_out is None else grad_out.to(torch.float64))
    close(loss, ref, "loss", LOSS_TOL)
    tol = GRAD_TOL if x["h"].dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    if reduce_hidden:
        close(h.grad, h64.grad, "hidden gradient (full on every rank)", tol)
    else:  # partials: their sum over the group is the full gradient
        total = h.grad.to(torch.float64 if ctx.device.type == "cpu" else torch.float32)
        dist.all_reduce(total, group=ctx.group)
        close(total, h64.grad, "sum of the hidden-gradient partials", tol)
    close(w.grad, w64.grad[sl], "weight gradient rows", tol)
    if b is not None:
        close(b.grad, b64.grad[sl], "bias gradient slice", tol)
    assert w.grad.dtype == w.dtype and h.grad.dtype == h.dtype
    return loss


@case
def linear_every_divergence(ctx):
    """Every divergence with CE mixing, biases, ignored rows and labels held elsewhere, several
    row chunks."""
    for i, div in enumerate(DIVERGENCES):
        x = make_linear(100 + i, 7, 12, 6, 5, bias=True)
        lab = make_labels(100 + i, (7,), 12, ctx)
        run_linear(ctx, x, lab, divergence=div, beta=0.7, ratio=0.6, temperature=2.0,
                   hard_weight=0.3, chunk_size=3)


@case
def linear_softcap_scales_padding(ctx):
    """Logit scales then softcaps then 1/T on both sides; a padded vocabulary; teacher logits
    precomputed (with its scale and softcap applied to a copy)."""
    x = make_linear(120, 6, 16, 5, 7)
    lab = make_labels(120, (6,), 13, ctx)
    run_linear(ctx, x, lab, divergence="jsd", temperature=1.7, hard_weight=0.5,
               student_softcap=2.5, teacher_softcap=3.0, student_logit_scale=0.8,
               teacher_logit_scale=1.2)
    run_linear(ctx, x, lab, divergence="reverse_kl", vocab_size=13, hard_weight=0.5,
               student_softcap=4.0, chunk_size=4)
    run_linear(ctx, x, lab, teacher_logits=True, divergence="forward_kl", hard_weight=0.2,
               teacher_softcap=2.0, teacher_logit_scale=0.9)


@case
def linear_reductions_and_partials(ctx):
    """reduction="none" (backward recomputes the chunks, collectives included), sum, mask,
    num_items_in_batch, shift_labels on [B, T, D], bf16 inputs, and the hidden-gradient
    partials with reduce_hidden_grad=False."""
    x = make_linear(130, 8, 12, 6, 4)
    lab = make_labels(130, (8,), 12, ctx, ignore=(1, 5))
    go = torch.randn(8, generator=torch.Generator().manual_seed(5))
    run_linear(ctx, x, lab, grad_out=go, reduction="none", divergence="tvd", hard_weight=0.5,
               chunk_size=3)
    run_linear(ctx, x, lab, reduction="sum", divergence="skew_forward_kl")
    mask = torch.tensor([True, True, False, True, True, True, False, True])
    run_linear(ctx, x, lab, mask=mask, num_items_in_batch=9, divergence="symmetric_kl")
    run_linear(ctx, x, lab.view(2, 4), lead=(2, 4), shift_labels=True, hard_weight=0.3,
               divergence="jsd")
    run_linear(ctx, x, lab, reduce_hidden=False, divergence="reverse_kl", hard_weight=0.4)
    xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
    run_linear(ctx, xb, lab, divergence="forward_kl", hard_weight=0.4)


@case
def public_api(ctx):
    """fd.distill_loss / fd.linear_distill_loss with vocab_group= and with DTensor inputs (and
    the DistillLoss module, which shares the dispatch) reach the vocabulary-parallel loss."""
    import fastdistill as fd
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from fastdistill.reference import reference_linear_distill_loss
    s, t = make_logits(190, (2, 3), 16)
    lab = make_labels(190, (2, 3), 11, ctx)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    run_logits(ctx, s, t, lab, public=True, divergence="jsd", hard_weight=0.5, vocab_size=11,
               mask=mask, temperature=2.0)
    run_logits(ctx, s, t, lab, public=True, divergence="tvd", reduction="none",
               student_logit_scale=1.5)
    run_logits(ctx, s, t, lab, public=True, divergence="symmetric_kl", shift_labels=True,
               num_items_in_batch=torch.tensor(3.0), hard_weight=0.2)
    x = make_linear(191, 6, 12, 5, 4, bias=True)
    lab6 = make_labels(191, (6,), 12, ctx)
    run_linear(ctx, x, lab6, public=True, divergence="skew_forward_kl", hard_weight=0.3,
               student_softcap=3.0, teacher_softcap=2.0, chunk_size=4)
    run_linear(ctx, x, lab6, public=True, teacher_logits=True, divergence="reverse_kl",
               reduction="sum")

    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    kw = dict(divergence="forward_kl", hard_weight=0.4, temperature=1.5)
    s2, t2 = s.reshape(6, 16), t.reshape(6, 16)
    ds = distribute_tensor(s2, mesh, [Shard(1)]).detach().requires_grad_(True)
    for loss in (fd.distill_loss(ds, distribute_tensor(t2, mesh, [Shard(1)]), lab6.clamp(max=15),
                                 **kw),
                 fd.DistillLoss(**kw)(ds, distribute_tensor(t2, mesh, [Shard(1)]),
                                      lab6.clamp(max=15))):
        ds.grad = None
        loss.backward()
        ref, ref_g = reference(s2, t2, lab6.clamp(max=15), **kw)
        close(loss, ref, "loss (DTensor logits)", LOSS_TOL)
        close(ds.grad.full_tensor(), ref_g, "gradient (DTensor logits)", GRAD_TOL)

    w = distribute_tensor(x["w"], mesh, [Shard(0)]).detach().requires_grad_(True)
    h = distribute_tensor(x["h"], mesh, [Replicate()]).detach().requires_grad_(True)
    loss = fd.linear_distill_loss(h, w, x["ht"], distribute_tensor(x["wt"], mesh, [Shard(0)]),
                                  lab6, **kw)
    loss.backward()
    h64 = x["h"].to(torch.float64).requires_grad_(True)
    w64 = x["w"].to(torch.float64).requires_grad_(True)
    ref = reference_linear_distill_loss(h64, w64, x["ht"], x["wt"], lab6, **kw)
    ref.backward()
    close(loss, ref, "loss (DTensor lm_head)", LOSS_TOL)
    close(w.grad.full_tensor(), w64.grad, "weight gradient (DTensor lm_head)", GRAD_TOL)
    close(h.grad.full_tensor(), h64.grad, "hidden gradient (DTensor lm_head)", GRAD_TOL)


# ---- DTensor inputs ---------------------------------------------------------------------------

@case
def dtensor_logits_uneven(ctx):
    """DTensor logits placed Shard(-1) with an uneven split (13 columns over the group), the
    gradient a Shard(-1) DTensor of the full gradient."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from fastdistill.config import DistillConfig
    from fastdistill.distributed import vocab_parallel_distill_loss
    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    s, t = make_logits(140, (5,), 13)
    lab = make_labels(140, (5,), 13, ctx)
    ds = distribute_tensor(s, mesh, [Shard(1)]).detach().requires_grad_(True)
    dt = distribute_tensor(t, mesh, [Shard(1)])
    kw = dict(divergence="jsd", beta=0.4, hard_weight=0.5, temperature=1.5)
    loss = vocab_parallel_distill_loss(ds, dt, lab, None, DistillConfig(**kw))
    loss.backward()
    ref, ref_g = reference(s, t, lab, **kw)
    close(loss, ref, "loss", LOSS_TOL)
    assert ds.grad.placements == (Shard(1),), ds.grad.placements
    close(ds.grad.full_tensor(), ref_g, "DTensor gradient", GRAD_TOL)


@case
def dtensor_linear_partial_and_sequence_gather(ctx):
    """A ColwiseParallel-style lm_head (weight Shard(0)) with replicated DTensor hidden states:
    the hidden gradient is a Partial() DTensor; with hidden states gathered from Shard(0)
    (tokens split over the ranks) it comes back reduce-scattered, each rank its own rows."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from fastdistill.config import DistillConfig
    from fastdistill.distributed import vocab_parallel_linear_distill_loss
    from fastdistill.reference import reference_linear_distill_loss
    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    N = 2 * ctx.size
    x = make_linear(150, N, 10, 6, 5)
    lab = make_labels(150, (N,), 10, ctx)
    kw = dict(divergence="skew_reverse_kl", beta=0.3, hard_weight=0.4, temperature=2.0)
    h64 = x["h"].to(torch.float64).requires_grad_(True)
    w64 = x["w"].to(torch.float64).requires_grad_(True)
    ref = reference_linear_distill_loss(h64, w64, x["ht"], x["wt"], lab, **kw)
    ref.backward()
    for gathered in (False, True):
        w = distribute_tensor(x["w"], mesh, [Shard(0)]).detach().requires_grad_(True)
        wt = distribute_tensor(x["wt"], mesh, [Shard(0)])
        if gathered:
            rows = slice(2 * ctx.rank, 2 * ctx.rank + 2)
            h_leaf = x["h"][rows].clone().requires_grad_(True)
            h = DTensor.from_local(h_leaf, mesh, [Shard(0)]) \
                .redistribute(mesh, [Replicate()])
            ht = distribute_tensor(x["ht"], mesh, [Replicate()])
        else:
            h = distribute_tensor(x["h"], mesh, [Replicate()]).detach().requires_grad_(True)
            ht = x["ht"]
        loss = vocab_parallel_linear_distill_loss(h, w, ht, wt, lab, cfg=DistillConfig(**kw))
        loss.backward()
        close(loss, ref, "loss", LOSS_TOL)
        assert w.grad.placements == (Shard(0),)
        close(w.grad.full_tensor(), w64.grad, "weight gradient", GRAD_TOL)
        if gathered:
            close(h_leaf.grad, h64.grad[rows], "hidden gradient rows (reduce-scattered)",
                  GRAD_TOL)
        else:
            assert isinstance(h.grad.placements[0], Partial), h.grad.placements
            close(h.grad.full_tensor(), h64.grad, "hidden gradient (Partial)", GRAD_TOL)


# ---- sharded weights (FSDP2) and data parallel ------------------------------------------------

class Head(torch.nn.Module):
    """A two-layer body and an lm_head (hidden states out of forward)."""

    def __init__(self, d, v, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = torch.nn.Linear(d, d)
        self.lm_head = torch.nn.Linear(d, v, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return torch.tanh(self.body(x))


@case
def fsdp2_lm_head(ctx):
    """FSDP2 student and teacher (data parallel, different rows per rank): the loss called with
    both lm_heads gathered through call_unsharded, num_items_in_batch from
    global_num_items_in_batch; the sharded gradients equal the single-process loss over all
    rows (FSDP averages gradients over the ranks: the loss, already a share of the global
    mean, is multiplied by the group size)."""
    import fastdistill as fd
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from fastdistill.distributed import call_unsharded, global_num_items_in_batch
    from fastdistill.reference import reference_linear_distill_loss
    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    D, Dt, V, n = 6, 5, 11, 3
    student, teacher = Head(D, V, 1), Head(Dt, V, 2)
    ref_student = Head(D, V, 1)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(160)
    X = torch.randn(ctx.size * n, D, generator=g)
    XT = torch.randn(ctx.size * n, Dt, generator=g)
    Y = torch.randint(0, V, (ctx.size * n,), generator=g)
    Y[1] = Y[n + 2] = -100
    kw = dict(divergence="jsd", beta=0.4, hard_weight=0.3, temperature=2.0)
    for m in (student, teacher):
        fully_shard(m.lm_head, mesh=mesh)
        fully_shard(m, mesh=mesh)
    rows = slice(ctx.rank * n, (ctx.rank + 1) * n)
    x, xt, y = X[rows], XT[rows], Y[rows]
    n_items = global_num_items_in_batch(y, group=ctx.group)
    assert int(n_items) == int((Y != -100).sum())
    h = student(x)
    with torch.no_grad():
        ht = teacher(xt)
    loss = call_unsharded(
        [student.lm_head, teacher.lm_head],
        lambda h_, ht_, y_: fd.linear_distill_loss(h_, student.lm_head.weight, ht_,
                                                   teacher.lm_head.weight, y_,
                                                   num_items_in_batch=n_items, **kw),
        h, ht, y)
    (loss * ctx.size).backward()
    # single process: every row, float64
    p64 = {k: v.detach().to(torch.float64).requires_grad_(True)
           for k, v in ref_student.named_parameters()}
    hs = torch.tanh(X.to(torch.float64) @ p64["body.weight"].t() + p64["body.bias"])
    with torch.no_grad():
        t64 = {k: v.detach().to(torch.float64) for k, v in Head(Dt, V, 2).named_parameters()}
    hts = torch.tanh(XT.to(torch.float64) @ t64["body.weight"].t() + t64["body.bias"])
    ref = reference_linear_distill_loss(hs, p64["lm_head.weight"], hts, t64["lm_head.weight"],
                                        Y, **kw)
    ref.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=ctx.group)
    close(total, ref, "sum of the ranks' losses", LOSS_TOL)
    for name, p in student.named_parameters():
        assert type(p).__name__ == "DTensor", name  # resharded after the loss
        close(p.grad.full_tensor(), p64[name].grad, f"{name} gradient", GRAD_TOL)
    assert all(p.grad is None for p in teacher.parameters())


@case
def num_items_helper(ctx):
    """global_num_items_in_batch: labels, mask, shift_labels; a tensor, clamped at 1."""
    from fastdistill.distributed import global_num_items_in_batch
    lab = torch.full((2, 5), -100)
    lab[0, ctx.rank % 5] = 3
    n = global_num_items_in_batch(lab, group=ctx.group)
    assert isinstance(n, torch.Tensor) and n.dim() == 0 and int(n) == ctx.size
    mask = torch.ones(2, 5, dtype=torch.bool)
    n = global_num_items_in_batch(mask=mask, shift_labels=True, group=ctx.group)
    assert int(n) == 8 * ctx.size
    n = global_num_items_in_batch(torch.full((3,), -100), group=ctx.group)
    assert int(n) == 1


@case
def errors(ctx):
    """Bad shards raise a ValueError on every rank, naming what was expected."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from fastdistill.config import DistillConfig
    from fastdistill.distributed import (vocab_parallel_distill_loss,
                                         vocab_parallel_linear_distill_loss)
    cfg = DistillConfig()

    def raises(match, fn):
        with pytest.raises((ValueError, TypeError), match=match):
            fn()

    s, t = make_logits(170, (4,), 12)
    w = 3 if ctx.rank == 0 else 2  # unequal plain widths
    raises("equally wide", lambda: vocab_parallel_distill_loss(s[:, :w], t[:, :w], None, None,
                                                               cfg, None, ctx.group))
    n = 4 if ctx.rank == 0 else 3  # different rows per rank
    raises("same rows", lambda: vocab_parallel_distill_loss(s[:n, :2], t[:n, :2], None, None,
                                                            cfg, None, ctx.group))
    raises("same vocabulary columns", lambda: vocab_parallel_distill_loss(
        s[:, :3], t[:, :2], None, None, cfg, None, ctx.group))
    raises("vocab_size must be in", lambda: vocab_parallel_distill_loss(
        s[:, :2], t[:, :2], None, None, cfg.replace(vocab_size=2 * ctx.size + 1), None,
        ctx.group))
    raises("group", lambda: vocab_parallel_distill_loss(s, t, None, None, cfg, None, "g"))
    raises("DistillConfig", lambda: vocab_parallel_distill_loss(s, t, None, None, {}, None,
                                                                 ctx.group))
    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    rep = distribute_tensor(s, mesh, [Replicate()])
    raises(r"placed \(Replicate\(\)\); a vocabulary-parallel loss needs it placed Shard\(-1\)",
           lambda: vocab_parallel_distill_loss(rep, rep, None, None, cfg))
    x = make_linear(171, 4, 8, 3, 3)
    wd = distribute_tensor(x["w"], mesh, [Shard(0)])
    raises("student_hidden is a plain tensor", lambda: vocab_parallel_linear_distill_loss(
        x["h"], wd, x["ht"], distribute_tensor(x["wt"], mesh, [Shard(0)]), cfg=cfg))
    raises("Shard\\(0\\)", lambda: vocab_parallel_linear_distill_loss(
        x["h"], distribute_tensor(x["w"], mesh, [Replicate()]), x["ht"], x["wt"], cfg=cfg,
        group=ctx.group))
    raises("hard_weight > 0 needs labels", lambda: vocab_parallel_distill_loss(
        s[:, :2], t[:, :2], None, None, cfg.replace(hard_weight=1.0), None, ctx.group))


# ---- the spawn --------------------------------------------------------------------------------

def _worker(rank, world, out_dir, backend, names):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    # a file rendezvous: no port to collide with other processes on the machine
    dist.init_process_group(backend, init_method="file://" + os.path.join(out_dir, "rendezvous"),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    groups = [("world", None)]
    if world >= 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append(("pair", pairs[rank // 2]))
    results = {}
    for name in names:
        for gname, group in groups:
            key = f"{name}[{gname}]"
            try:
                torch.manual_seed(0)
                CASES[name](Ctx(group if group is not None else dist.group.WORLD, device))
                results[key] = "ok"
            except BaseException:  # noqa: BLE001  (recorded, reported by the case's test)
                results[key] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn(world, backend="gloo", names=None):
    names = list(CASES) if names is None else names
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, out, backend, names),
                                 nprocs=world, join=False, start_method="spawn")
        t0 = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - t0 > TIMEOUT_S:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                raise TimeoutError(f"the {world} worker processes ran past {TIMEOUT_S} s")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def results():
    return spawn(WORLD)


@pytest.mark.parametrize("name", list(CASES))
def test_case(results, name):
    """Each case, in the 4-rank group and in the 2-rank groups, on every rank."""
    failures = [f"rank {r}, {key}:\n{res}" for r, per_rank in enumerate(results)
                for key, res in per_rank.items() if key.startswith(name + "[") and res != "ok"]
    ran = [key for key in results[0] if key.startswith(name + "[")]
    assert ran, f"case {name} did not run"
    assert not failures, "\n".join(failures)


def test_example():
    """examples/distributed.py under torchrun with two gloo processes: its step-0 check of the
    loss and every gradient against one float64 process passes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", os.path.join(root, "examples", "distributed.py"),
                           "--steps", "3"], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "largest gradient difference" in proc.stdout, proc.stdout


@pytest.mark.gpu
def test_nccl():
    """The same cases on CUDA tensors with NCCL: one process per GPU (at most 4; a single GPU
    runs a group of one)."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    world = min(torch.cuda.device_count(), 4)
    names = [n for n in CASES if n.startswith(("logits_", "linear_"))]
    out = spawn(world, "nccl", names)
    failures = [f"rank {r}, {k}:\n{v}" for r, res in enumerate(out) for k, v in res.items()
                if v != "ok"]
    assert not failures, "\n".join(failures)
