"""Both Triton logit-level kernels (fastdistill/kernels/distill.py) against the float64
reference, on CPU through the interpreter: the row kernel (sm_90: the row in registers, NT tiles,
a cluster of CTAs on the GPU) with one and several tiles, aligned and unaligned rows, and the
streaming kernel that sm_80 and rows too wide for the row kernel get; and the launcher's choice
between them."""

import pytest
import torch

import fastdistill as fd
from fastdistill.kernels import distill
from fastdistill.reference import reference_distill_loss
from util import F16, F32, assert_close, logits, tolerances

pytestmark = pytest.mark.skipif(not distill.interpreting(),
                                reason="the interpreter runs these kernels on CPU tensors")


def check(s, t, labels, **kw):
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, labels, backend="triton", reduction="none", **kw)
    loss.backward(torch.ones_like(loss))
    s64 = s.double().requires_grad_()
    ref = reference_distill_loss(s64, t.double(), labels, reduction="none", **kw)
    ref.backward(torch.ones_like(ref))
    lt, gt = tolerances(s.dtype)
    assert_close(loss, ref, **lt, what=f"loss {kw}")
    assert_close(sg.grad, s64.grad, **gt, what=f"grad {kw}")


@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
@pytest.mark.parametrize("cap", [(8, 0), (9, 0)])
def test_both_kernels(monkeypatch, divergence, cap):
    monkeypatch.setattr(distill, "VIRTUAL_CAPABILITY", cap)
    N, V = 3, 300
    s, t = logits((N, V)), logits((N, V))
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    check(s, t, labels, divergence=divergence, beta=0.3, ratio=0.4, temperature=1.6,
          hard_weight=0.3)
    # unaligned rows (an odd row stride): element loads and smaller tiles on the row kernel
    big_s, big_t = logits((N, V + 3)), logits((N, V + 1))
    check(big_s[:, 1:V + 1], big_t[:, :V], labels, divergence=divergence, beta=0.6,
          ratio=0.7, temperature=0.8)


def test_row_plan():
    """Tiles, clusters and the fallback: powers of two covering the row in at most 8 tiles,
    whole 16-byte vectors per thread on aligned rows, at most the allowed columns per thread,
    none on sm_80 or past 16 CTAs."""
    assert distill.row_plan(128256, 2, (8, 0)) is None
    for V in (37, 300, 4099, 50257, 128256, 151936, 256000):
        for e in (2, 4):
            for aligned in (True, False):
                for elems in (8, 16, 32):
                    p = distill.row_plan(V, e, (9, 0), elems=elems, aligned=aligned)
                    if p is None:
                        assert V > elems * 16 * 32 * distill.ROW_WARPS // 2
                        continue
                    nt, tb, ctas, warps = p
                    threads = ctas * 32 * warps
                    assert tb & (tb - 1) == 0 and 1 <= nt <= 8 and (nt - 1) * tb < V <= nt * tb
                    assert ctas in (1, 2, 4, 8, 16) and nt * tb <= elems * threads
                    if aligned:
                        assert tb % (threads * 16 // e) == 0
    # the presets' vocabularies: the row kernel for the KL family in bf16
    assert distill.row_plan(256000, 2, (9, 0)) == (4, 65536, 16, 16)
    assert distill.row_plan(50257, 2, (9, 0), aligned=False, elems=16)[0] == 7
    # the mixtures at Qwen's 151936 in bf16: too wide for four values per column, LEAN fits;
    # 256000 streams
    jsd, mix = 2, distill.row_elems(2, 2, True, False)
    assert distill.row_plan(151936, 2, (9, 0), elems=mix) is None
    assert distill.row_plan(151936, 2, (9, 0), elems=distill.row_elems_lean(jsd, mix, False))
    assert distill.row_plan(256000, 2, (9, 0),
                            elems=distill.row_elems_lean(jsd, mix, False)) is None


@pytest.mark.parametrize("dtype", [F32, F16])  # no bfloat16 arithmetic in the interpreter
def test_several_tiles_and_padding_columns(monkeypatch, dtype):
    """A row kernel of several tiles (an unaligned row of 1029 columns: 3 tiles), a gradient
    wider than the vocabulary (zeros past V), the gradient written over the student."""
    monkeypatch.setattr(distill, "VIRTUAL_CAPABILITY", (9, 0))
    N, V, W = 2, 1029, 1040
    big = logits((N, W + 1), dtype)
    s = big[:, 1:W + 1]
    t = logits((N, V), dtype)
    assert distill.row_plan(V, s.element_size(), (9, 0), aligned=False, elems=16)[0] > 1
    labels = torch.tensor([3, V - 1])
    from fastdistill.config import DistillConfig
    opts = DistillConfig(divergence="jsd", beta=0.4, hard_weight=0.5,
                         temperature=1.5).kernel_options()
    gs = torch.tensor(1.0)
    s0 = s[:, :V].clone()
    rows, g = distill.distill_forward(s, t, labels, opts, V, gs, True, s)
    assert g.data_ptr() == s.data_ptr() and torch.all(s[:, V:] == 0)
    s64 = s0.double().requires_grad_()
    ref = reference_distill_loss(s64, t.double(), labels, divergence="jsd", beta=0.4,
                                 hard_weight=0.5, temperature=1.5, reduction="none")
    ref.backward(torch.ones_like(ref))
    lt, gt = tolerances(dtype)
    assert_close(rows, ref, **lt, what="loss")
    assert_close(s[:, :V], s64.grad, **gt, what="grad")


class _LaunchSpy:
    """Stands for distill_row_kernel in the launcher and records the LEAN flag of each launch."""

    def __init__(self, kernel):
        self.kernel, self.lean = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.lean.append(kw["LEAN"])
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("dtype", [F32, F16])  # no bfloat16 arithmetic in the interpreter
def test_lean_row_kernel(monkeypatch, divergence, dtype):
    """The mixtures' row kernel for rows twice as wide as their four values per column allow
    (LEAN: the raw logits kept, exponentials and h taken again in passes 2 and 3): forced at a
    small row by allowing fewer columns per thread, against the float64 reference, with a
    -inf logit (the guarded sums), an ignored row, a hard loss with its own log-sum-exp (T != 1)
    and one folded into the soft gradient (T = 1)."""
    monkeypatch.setattr(distill, "VIRTUAL_CAPABILITY", (9, 0))
    e = dtype.itemsize
    monkeypatch.setattr(distill, "row_elems", lambda *a: 8 // e)  # one 16-byte vector: too few
    spy = _LaunchSpy(distill.distill_row_kernel)
    monkeypatch.setattr(distill, "distill_row_kernel", spy)
    N, V = 4, 304  # aligned rows in both dtypes
    assert distill.row_plan(V, e, (9, 0), elems=8 // e) is None
    assert distill.row_plan(V, e, (9, 0), elems=16 // e) is not None
    s, t = logits((N, V), dtype), logits((N, V), dtype)
    s[2, 7] = float("-inf")
    t[3, 11] = float("-inf")
    labels = torch.tensor([5, -100, 299, 0])
    for temperature in (1.7, 1.0):
        check(s, t, labels, divergence=divergence, beta=0.3, temperature=temperature,
              hard_weight=0.4)
    assert spy.lean and all(spy.lean)
