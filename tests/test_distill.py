"""distill_loss (the logit-level op) on every backend of both devices, against the float64
reference: torch, cpu, triton (interpreter) and the CUDA kernels' source (cuda_emu) on CPU
tensors; torch, cuda and triton on a GPU (gpu-marked, skipped without one)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastdistill as fd
from fastdistill import backends
from fastdistill.config import DistillConfig
from fastdistill.reference import reference_distill_loss
from util import (BF16, DTYPES, F16, F32, GRAD_TOL, LOSS_TOL, assert_close, cases, logits,
                  run_both, small, tolerances)

DIVS = fd.DIVERGENCES
MIX = ("jsd", "skew_forward_kl", "skew_reverse_kl")
# beta (ratio for symmetric_kl) matters for the mixtures: endpoints and an interior value
DIV_BETA = [(d, b) for d in DIVS for b in ((0.0, 0.3, 1.0) if d in MIX + ("symmetric_kl",)
                                            else (0.3,))]


def kw_beta(divergence, b):
    return dict(divergence=divergence, ratio=b) if divergence == "symmetric_kl" else \
        dict(divergence=divergence, beta=b)


def shape(backend, device, cpu=(6, 333), tiny=(4, 150), gpu=(6, 3001)):
    if device == "cuda":
        return gpu
    return tiny if small(backend, device) else cpu


def make(shape_, dtype, device, scale=3.0):
    return logits(shape_, dtype, scale, device=torch.device(device))


def check(backend, s, t, labels=None, grad_out=None, loss_tol=None, grad_tol=None, **kw):
    lt, gt = tolerances(s.dtype)
    loss, grad, ref, ref_grad = run_both(s, t, labels, grad_out, backend=backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_close(loss, ref, **(loss_tol or lt), what=f"{backend} loss {kw}")
    assert_close(grad, ref_grad, **(grad_tol or gt), what=f"{backend} grad {kw}")
    return loss, grad


def direct(backend, s, t, labels=None, *, vocab=None, need_grad=True, grad_out=None,
           scale=1.0, **kw):
    """The backend's distill_forward on 2-D tensors: (loss rows, gradient)."""
    opts = DistillConfig(**kw).kernel_options()
    gs = torch.tensor(scale, dtype=torch.float32, device=s.device)
    return backends.get(backend).distill_forward(
        s, t, labels, opts, vocab if vocab is not None else s.shape[1], gs, need_grad, grad_out)


# ---- values and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES))
@pytest.mark.parametrize("divergence,beta", DIV_BETA)
def test_divergences(device, backend, dtype, divergence, beta):
    N, V = shape(backend, device)
    check(backend, make((N, V), dtype, device), make((N, V), dtype, device),
          **kw_beta(divergence, beta))


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature,t2", [(0.5, False), (2.5, True), (1.0, True)])
def test_temperature_hard_mix_ignore(device, backend, dtype, divergence, temperature, t2):
    N, V = shape(backend, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = -100
    labels[2] = V - 1  # the last column (the partial last unit or tile)
    loss, grad = check(backend, make((N, V), dtype, device), make((N, V), dtype, device),
                       labels, torch.rand(N, device=device) + 0.5, divergence=divergence,
                       beta=0.7, ratio=0.6, temperature=temperature, t2_scale=t2,
                       hard_weight=0.4, soft_weight=0.6, reduction="none")
    assert loss[1] == 0 and torch.all(grad[1] == 0), "ignored rows: zero loss and gradient"


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "symmetric_kl", "tvd"])
def test_logit_scales(device, backend, dtype, divergence):
    """z * scale first, then 1 / T; CE on the scaled student at T = 1."""
    N, V = shape(backend, device)
    labels = torch.randint(0, V, (N,), device=device)
    check(backend, make((N, V), dtype, device), make((N, V), dtype, device), labels,
          divergence=divergence, temperature=1.5, student_logit_scale=0.7,
          teacher_logit_scale=1.8, hard_weight=0.3)
    # a scale equal on both sides and T = scale: the same as no scale at T = 1 (soft part)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    a = fd.distill_loss(s, t, divergence=divergence, temperature=2.0, student_logit_scale=2.0,
                        teacher_logit_scale=2.0, backend=backend)
    b = fd.distill_loss(s, t, divergence=divergence, backend=backend)
    assert_close(a, b, rtol=1e-5, atol=1e-6, what="scale / T folded")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_symmetric_kl_is_the_weighted_sum(device, backend, dtype):
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    sym = fd.distill_loss(s, t, divergence="symmetric_kl", ratio=0.3, temperature=1.3,
                          backend=backend)
    f = fd.distill_loss(s, t, divergence="forward_kl", temperature=1.3, backend=backend)
    r = fd.distill_loss(s, t, divergence="reverse_kl", temperature=1.3, backend=backend)
    assert_close(sym, 0.3 * f + 0.7 * r, rtol=1e-5, atol=1e-6, what="0.3 FKL + 0.7 RKL")


@pytest.mark.parametrize("device,backend,dtype", cases(only=("torch", "cpu", "triton", "cuda")))
def test_peers_cross_entropy_and_kl_div(device, backend, dtype):
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[0] = 7
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, labels, hard_weight=1.0, soft_weight=0.0, ignore_index=7,
                           temperature=3.0, backend=backend)
    loss.backward()
    s2 = s.double().requires_grad_()
    ce = F.cross_entropy(s2, labels, ignore_index=7)
    ce.backward()
    assert_close(loss, ce, **LOSS_TOL, what="hard-only loss vs F.cross_entropy")
    assert_close(sg.grad, s2.grad, **GRAD_TOL, what="hard-only grad vs F.cross_entropy")
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, temperature=2.0, backend=backend)
    loss.backward()
    s2 = s.double().requires_grad_()
    kl = F.kl_div(torch.log_softmax(s2 / 2, -1), torch.log_softmax(t.double() / 2, -1),
                  log_target=True, reduction="batchmean")
    kl.backward()
    assert_close(loss, kl, **LOSS_TOL, what="forward_kl vs F.kl_div")
    assert_close(sg.grad, s2.grad, **GRAD_TOL, what="forward_kl grad vs F.kl_div")


# ---- which rows count, and reductions ----------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_reductions_and_ignore(device, backend, dtype, reduction):
    N, V = shape(backend, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::2] = -100
    grad_out = torch.rand(N, device=device) + 0.5 if reduction == "none" else None
    loss, grad = check(backend, make((N, V), dtype, device), make((N, V), dtype, device),
                       labels, grad_out, divergence="jsd", reduction=reduction, hard_weight=0.5)
    ignored = labels == -100
    assert torch.all(grad[ignored] == 0), "ignored rows must get exactly zero gradient"
    if reduction == "none":
        assert loss.shape == (N,) and torch.all(loss[ignored] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases(only=("torch", "cpu", "triton")))
def test_batchmean_without_labels_divides_by_the_first_dimension(device, backend, dtype):
    s, t = make((3, 4, 50), dtype, device), make((3, 4, 50), dtype, device)
    loss = fd.distill_loss(s, t, reduction="batchmean", backend=backend)
    total = fd.distill_loss(s, t, reduction="sum", backend=backend)
    assert_close(loss, total / 3, rtol=1e-6, atol=0, what="sum / input.shape[0]")
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    mask[0, 1] = False
    loss = fd.distill_loss(s, t, mask=mask, reduction="batchmean", backend=backend)
    assert_close(loss, fd.distill_loss(s, t, mask=mask, backend=backend), rtol=1e-6, atol=0,
                 what="with a mask: per counted token")


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(device, backend, dtype, as_tensor):
    N, V = shape(backend, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[0] = -100
    n = torch.tensor(11, device=device) if as_tensor else 11
    check(backend, make((N, V), dtype, device), make((N, V), dtype, device), labels,
          divergence="reverse_kl", num_items_in_batch=n, hard_weight=0.2)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_all_ignored_is_zero_not_nan(device, backend, dtype, reduction):
    N, V = shape(backend, device)
    labels = torch.full((N,), -100, device=device)
    s = make((N, V), dtype, device).requires_grad_()
    loss = fd.distill_loss(s, make((N, V), dtype, device), labels, reduction=reduction,
                           hard_weight=1.0, backend=backend)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_mask(device, backend, dtype):
    """mask alone, and with labels: a token counts where both say so."""
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[1::2] = False
    loss, grad = check(backend, s, t, mask=mask, divergence="skew_reverse_kl", beta=0.3)
    assert torch.all(grad[~mask] == 0)
    labels = torch.randint(0, V, (N,), device=device)
    labels[0] = -100
    check(backend, s, t, labels, mask=mask, divergence="forward_kl", hard_weight=0.5,
          reduction="none")
    # the same as labels with ignore_index where the mask is False
    a = fd.distill_loss(s, t, labels, mask=mask, hard_weight=0.5, backend=backend)
    b = fd.distill_loss(s, t, torch.where(mask, labels, -100), hard_weight=0.5, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("reduction", ["mean", "none", "batchmean"])
def test_shift_labels(device, backend, dtype, reduction):
    """shift_labels=True is logits[:, :-1] against labels[:, 1:] (and mask[:, 1:])."""
    B, L, V = 2, 4, shape(backend, device)[1]
    s, t = make((B, L, V), dtype, device), make((B, L, V), dtype, device)
    labels = torch.randint(0, V, (B, L), device=device)
    labels[0, 2] = -100
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[1, 1] = False
    kw = dict(divergence="jsd", hard_weight=0.3, reduction=reduction, backend=backend)
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, labels, mask=mask, shift_labels=True, **kw)
    loss.backward(torch.ones_like(loss))
    s2 = s.clone().requires_grad_()
    want = fd.distill_loss(s2[:, :-1], t[:, :-1], labels[:, 1:], mask=mask[:, 1:], **kw)
    want.backward(torch.ones_like(want))
    assert loss.shape == want.shape
    assert_close(loss, want, rtol=1e-6, atol=1e-7, what="shifted loss")
    assert_close(sg.grad, s2.grad, rtol=1e-6, atol=1e-8, what="shifted gradient")
    check(backend, s, t, labels, mask=mask, shift_labels=True, divergence="jsd",
          hard_weight=0.3, reduction=reduction)


# ---- vocabulary: padding, -inf columns, ties, extremes ------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases((F32, BF16)))
def test_vocab_padding_is_never_read(device, backend, dtype):
    N, V = shape(backend, device)
    s, t = make((N, V + 24), dtype, device), make((N, V + 5), dtype, device)
    s[:, V:] = math.nan  # anything read from the padding would show up as NaN
    t[:, V:] = math.nan
    labels = torch.randint(0, V, (N,), device=device)
    loss, grad = check(backend, s, t, labels, vocab_size=V, divergence="skew_forward_kl",
                       hard_weight=0.3)
    assert torch.isfinite(loss)
    assert torch.all(grad[:, V:] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_masked_vocabulary_neg_inf(device, backend, dtype, divergence):
    """-inf at the same columns of both (masked tokens): exact, finite, no mass there."""
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    cols = torch.randperm(V - 1, device=device)[: V // 3] + 1  # column 0 stays real
    cols = cols[cols != 5]
    s[:, cols] = -math.inf
    t[:, cols] = -math.inf
    s[0, :] = -math.inf
    t[0, :] = -math.inf
    s[0, 5], t[0, 5] = 2.0, -1.0  # row 0: a single finite column on both sides
    labels = torch.zeros(N, dtype=torch.long, device=device)
    labels[0] = 5
    loss, grad = check(backend, s, t, labels, divergence=divergence, beta=0.4, hard_weight=0.5,
                       temperature=1.5, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.all(grad[:, cols] == 0), "masked columns must get no gradient"


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "tvd"])
def test_teacher_neg_inf_only(device, backend, dtype, divergence):
    """The teacher rules out columns the student still scores: these stay finite."""
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    t[:, ::4] = -math.inf
    loss, _ = check(backend, s, t, divergence=divergence, beta=0.5, reduction="none")
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_identical_distributions(device, backend, dtype, divergence):
    """P == Q: every divergence is 0 with zero gradient (tvd's sign(0) included)."""
    N, V = shape(backend, device)
    s = make((N, V), dtype, device)
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, s.clone(), divergence=divergence, beta=0.5, backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-5
    assert sg.grad.abs().max() < 1e-6


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_ties_and_extremes(device, backend, dtype, divergence):
    N, V = shape(backend, device)
    s = torch.zeros(N, V, device=device)  # uniform student (all ties)
    t = make((N, V), dtype, device, scale=1.0)
    t[1] = 0.0                            # uniform teacher in row 1
    t[2, :] = -3e4                        # huge negative offsets: softmax is shift-invariant
    t[2, 3] = 3e4                         # one dominant column
    s[3] = make((V,), dtype, device, scale=50.0)  # a very peaked student
    check(backend, s, t, divergence=divergence, beta=0.25, temperature=0.7,
          loss_tol=dict(rtol=1e-4, atol=1e-4), grad_tol=dict(rtol=1e-4, atol=1e-5))


# ---- shapes, layouts, dtypes --------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES))
def test_single_row_odd_vocab_and_leading_dims(device, backend, dtype):
    V = 37 if small(backend, device) else 50257
    check(backend, make((1, V), dtype, device), make((1, V), dtype, device))
    W = 1029 if small(backend, device) else 50257  # odd: rows after the first are misaligned
    labels = torch.randint(0, W, (3,), device=device)
    check(backend, make((3, W), dtype, device), make((3, W), dtype, device), labels,
          divergence="skew_reverse_kl", beta=0.2, hard_weight=0.5, temperature=1.3)
    check(backend, make((2, 3, 41), dtype, device), make((2, 3, 41), dtype, device),
          torch.randint(0, 41, (2, 3), device=device), divergence="tvd", hard_weight=0.1,
          reduction="none")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_mixed_input_dtypes(device, backend, dtype):
    N, V = shape(backend, device)
    pairs = [(F32, F16)] if backend == "triton" and device == "cpu" else \
        [(BF16, F32), (F32, F16), (F16, BF16)]
    for sd, td in pairs:
        check(backend, make((N, V), sd, device), make((N, V), td, device),
              divergence="reverse_kl")


@pytest.mark.parametrize("device,backend,dtype", cases((F32, BF16)))
def test_misaligned_and_strided_rows(device, backend, dtype):
    N, V = shape(backend, device)
    big_s, big_t = make((N, V + 9), dtype, device), make((2 * N, V + 3), dtype, device)
    s, t = big_s[:, 1:V + 1], big_t[::2, 3:]  # odd offsets and row strides
    labels = torch.randint(0, V, (N,), device=device)
    check(backend, s, t, labels, divergence="jsd", hard_weight=0.3, reduction="none")
    if backend in ("cuda", "cuda_emu"):  # the same values as aligned copies, bit for bit
        kw = dict(divergence="jsd", hard_weight=0.3)
        l1, g1 = direct(backend, s, t, labels, **kw)
        l2, g2 = direct(backend, s.contiguous(), t.contiguous(), labels, **kw)
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    st = make((V, N), dtype, device).t()  # unit stride along the rows only: copied
    check(backend, st, t.contiguous(), divergence="tvd")


@pytest.mark.parametrize("device,backend,dtype", cases((F32, BF16)))
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_forward_kl", "symmetric_kl"])
def test_gradient_written_over_the_student(device, backend, dtype, divergence):
    """grad_out = student: each element is read before it is overwritten; the result is the
    gradient of the original logits, bitwise equal to a separate buffer."""
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    kw = dict(divergence=divergence, hard_weight=0.5, temperature=1.7, beta=0.3)
    loss1, grad1 = direct(backend, s, t, labels, **kw)
    buf = s.clone()
    loss2, grad2 = direct(backend, buf, t, labels, grad_out=buf, **kw)
    assert grad2.data_ptr() == buf.data_ptr()
    assert torch.equal(loss1, loss2) and torch.equal(grad1, buf)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_deterministic_and_independent_of_the_batch(device, backend, dtype, divergence):
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    kw = dict(divergence=divergence, hard_weight=0.3, temperature=0.8)
    a, b = direct(backend, s, t, labels, **kw), direct(backend, s, t, labels, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    part = direct(backend, s[1:3], t[1:3], labels[1:3], **kw)
    assert torch.equal(a[0][1:3], part[0]) and torch.equal(a[1][1:3], part[1])


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_empty_batch_and_loss_only(device, backend, dtype):
    s = torch.zeros(0, 11, device=device, requires_grad=True)
    t = torch.zeros(0, 11, device=device)
    loss = fd.distill_loss(s, t, backend=backend)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert s.grad.shape == (0, 11)
    assert fd.distill_loss(s, t, reduction="none", backend=backend).shape == (0,)
    N, V = shape(backend, device)
    s, t = make((N, V), dtype, device), make((N, V), dtype, device)
    with torch.no_grad():
        loss = fd.distill_loss(s, t, divergence="jsd", reduction="none", backend=backend)
    ref = reference_distill_loss(s.double(), t.double(), divergence="jsd", reduction="none")
    assert_close(loss, ref, **LOSS_TOL, what="loss without gradient")
    g1 = direct(backend, s, t, scale=1.0)[1]
    g4 = direct(backend, s, t, scale=0.25)[1]
    assert_close(g4, g1 * 0.25, rtol=1e-6, atol=0, what="grad_scale read on the device")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_labels_out_of_range_below_the_api(device, backend, dtype):
    """What the kernels do with a label the API rejects on CPU (on a GPU it is not checked, to
    avoid a host sync): a NaN loss and a zero gradient for that row only."""
    N, V = shape(backend, device)
    s, t = make((3, V), dtype, device), make((3, V), dtype, device)
    labels = torch.tensor([2, V, -7], device=device)
    rows, grad = direct(backend, s, t, labels, hard_weight=1.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()
    assert torch.all(grad[1:] == 0) and grad[0].abs().sum() > 0
    rows2, grad2 = direct(backend, s, t, labels, hard_weight=1.0, need_grad=False)
    assert grad2 is None and torch.equal(rows[:1], rows2[:1]) and torch.isnan(rows2[1:]).all()


@pytest.mark.parametrize("device,backend,dtype", cases((BF16,), only=("cuda_emu",), gpu=False)
                         + cases((BF16,), cpu=False))
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_llama3_wide_rows(device, backend, dtype, divergence):
    V = 128256
    s, t = make((3, V), dtype, device), make((3, V), dtype, device)
    labels = torch.randint(0, V, (3,), device=device)
    check(backend, s, t, labels, divergence=divergence, hard_weight=0.2, temperature=2.0)
