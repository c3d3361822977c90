"""Special values, the same on every backend (RELIABILITY.md): NaN, +-inf and all -inf rows,
subnormal probabilities, huge logits; rows that do not count stay exactly 0."""

import math

import pytest
import torch

import fastdistill as fd
from fastdistill.reference import reference_distill_loss, reference_feature_loss
from util import assert_close, cases, logits, small

DIVS = fd.DIVERGENCES
EPS = 2.0 ** -24


def special_rows(V, block, device):
    """Rows (student, teacher), each a case of RELIABILITY.md; `block` spans whole tiles /
    chunks of the kernels (the merge of a tile whose one side is all -inf)."""
    s, t = logits((9, V), device=torch.device(device)), logits((9, V), device=torch.device(device))
    s[0, block] = -math.inf                    # student -inf where P has mass: FKL = +inf
    t[1, block] = -math.inf                    # teacher -inf where Q has mass: RKL = +inf
    s[2, :] = -math.inf                        # no student distribution: NaN
    t[3, :] = -math.inf                        # no teacher distribution: NaN
    t[4, 5] = math.nan                         # NaN in the teacher: NaN
    s[5, 9] = math.nan                         # NaN in the student: NaN
    s[6, 7] = math.inf                         # +inf logit: NaN
    t[7, :] = -math.inf                        # one-hot teacher, student -inf elsewhere
    t[7, 3] = 1.0
    s[7, block] = -math.inf
    s[8, V - 1] = -math.inf                    # a single -inf on both sides: exact
    t[8, V - 1] = -math.inf
    return s, t


NAN_ROWS = (2, 3, 4, 5, 6)  # no distribution: NaN loss and NaN gradient


def grad_undefined_rows(divergence, rows_inf_rkl):
    """Rows whose reverse-KL term is +inf: gradient NaN (undefined) for reverse / symmetric KL."""
    return rows_inf_rkl if divergence in ("reverse_kl", "symmetric_kl") else ()


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_special_rows(device, backend, dtype, divergence):
    V = 300 if small(backend, device) else 3000
    block = slice(64, 192) if small(backend, device) else slice(1024, 2048)
    s, t = special_rows(V, block, device)
    sg = s.clone().requires_grad_()
    kw = dict(divergence=divergence, beta=0.3, ratio=0.4, reduction="none")
    loss = fd.distill_loss(sg, t, backend=backend, **kw)
    loss.backward(torch.ones_like(loss))
    s64 = s.double().requires_grad_()
    ref = reference_distill_loss(s64, t.double(), **kw)
    ref.backward(torch.ones_like(ref))
    assert_close(loss, ref, rtol=2e-5, atol=2e-5, what="loss, special rows")
    # KL(P||Q) = +inf in row 0 and KL(Q||P) = +inf in rows 1 and 7 (where they appear)
    if divergence in ("forward_kl", "symmetric_kl"):
        assert loss[0] == math.inf
    if divergence in ("reverse_kl", "symmetric_kl"):
        assert loss[1] == math.inf and loss[7] == math.inf
    undefined = set(NAN_ROWS) | set(grad_undefined_rows(divergence, (1, 7)))
    for r in range(9):
        if r in undefined:
            assert torch.isnan(sg.grad[r]).all(), f"row {r}: the gradient must be NaN"
            assert torch.isnan(loss[r]) or r not in NAN_ROWS
        else:
            assert torch.isfinite(sg.grad[r]).all(), f"row {r}: finite gradient expected"
            assert_close(sg.grad[r], s64.grad[r], rtol=1e-4, atol=2e-6, what=f"grad row {r}")
    assert torch.all(sg.grad[8, V - 1] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_rows_that_do_not_count_stay_zero(device, backend, dtype):
    V = 300 if small(backend, device) else 3000
    block = slice(64, 192) if small(backend, device) else slice(1024, 2048)
    s, t = special_rows(V, block, device)
    labels = torch.full((9,), -100, device=device)
    labels[0] = 3  # one row counts (FKL = +inf there)
    for divergence in DIVS:
        sg = s.clone().requires_grad_()
        loss = fd.distill_loss(sg, t, labels, divergence=divergence, reduction="none",
                               backend=backend)
        loss.backward(torch.ones_like(loss))
        assert torch.all(loss[1:] == 0) and torch.all(sg.grad[1:] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", ["skew_reverse_kl", "skew_forward_kl", "jsd"])
def test_subnormal_probabilities_do_not_make_infinities(device, backend, dtype, divergence):
    """At T = 0.1 some q are subnormal (3e-45): beta * q underflows to 0, and log of the
    mixture must not become -inf (it did: a loss of +inf on clean inputs)."""
    V = 200 if small(backend, device) else 2000
    s, t = logits((4, V), device=torch.device(device)), logits((4, V), device=torch.device(device))
    s[:, 0] = s.amax(-1) + 103 * 0.1  # the rest of the row is ~1e-45 relative to column 0
    t[:, 1] = -math.inf
    for beta in (0.5, 1e-3, 1.0 - 1e-3):
        sg = s.clone().requires_grad_()
        loss = fd.distill_loss(sg, t, divergence=divergence, beta=beta, temperature=0.1,
                               backend=backend)
        loss.backward()
        s64 = s.double().requires_grad_()
        ref = reference_distill_loss(s64, t.double(), divergence=divergence, beta=beta,
                                     temperature=0.1)
        ref.backward()
        assert math.isfinite(float(loss)) and torch.isfinite(sg.grad).all()
        assert_close(loss, ref, rtol=1e-4, atol=1e-5, what=f"{divergence} beta={beta}")
        assert_close(sg.grad, s64.grad, rtol=1e-3, atol=1e-5, what=f"grad beta={beta}")


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("scale", [1e2, 1e3, 3e4])
def test_huge_logits_error_bound(device, backend, dtype, divergence, scale):
    """Logits of magnitude L: the loss keeps float32 relative accuracy; a gradient element has
    an absolute error of at most 8 eps (L + 1) (p_j + q_j) (1 + min(|log q_j - log p_j|, 2L))
    / T (RELIABILITY.md): probabilities carry the relative rounding of shifted logits of size
    up to L, and log-ratios of size L are rounded before they are subtracted. tvd's gradient
    jumps where p_j = q_j, so only its loss is held to the bound."""
    N, V = (4, 120) if small(backend, device) else (6, 400)
    dev = torch.device(device)
    s, t = logits((N, V), scale=scale, device=dev), logits((N, V), scale=scale, device=dev)
    t[1] = s[1] + logits((V,), scale=scale * 1e-3, device=dev)  # close distributions
    s[2] = 0.5 * t[2] + logits((V,), scale=1.0, device=dev)
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, divergence=divergence, beta=0.3, reduction="sum",
                           backend=backend)
    loss.backward()
    s64 = s.double().requires_grad_()
    ref = reference_distill_loss(s64, t.double(), divergence=divergence, beta=0.3,
                                 reduction="sum")
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-5
    L = float(torch.maximum(s.abs().max(), t.abs().max()))
    if divergence == "tvd":
        return
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    q, p = lq.exp(), lp.exp()
    bound = 8 * EPS * (L + 1) * (p + q) * (1 + torch.clamp((lq - lp).abs(), max=2 * L)) + 1e-30
    err = (sg.grad.double() - s64.grad).abs()
    assert torch.all(err <= bound), f"max err / bound = {float((err / bound).max()):.2f}"


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("kind", fd.FEATURE_KINDS)
def test_feature_nan_rows(device, backend, dtype, kind):
    """A NaN in a row that counts gives that row a NaN loss and NaN gradient on every backend
    (normalized_mse included); masked rows stay 0."""
    dev = torch.device(device)
    s, t = logits((4, 64), scale=1.0, device=dev), logits((4, 64), scale=1.0, device=dev)
    s[1, 3] = math.nan
    t[2, 5] = math.nan
    s[3, 0] = math.nan
    mask = torch.tensor([True, True, True, False], device=dev)
    sg = s.clone().requires_grad_()
    loss = fd.feature_loss(sg, t, kind=kind, mask=mask, reduction="none", backend=backend)
    loss.backward(torch.ones_like(loss))
    ref = reference_feature_loss(s.double(), t.double(), kind=kind, mask=mask,
                                 reduction="none")
    assert_close(loss, ref, rtol=1e-5, atol=1e-5, what="feature loss with NaN rows")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and loss[3] == 0
    assert torch.isnan(sg.grad[1]).all() and torch.isnan(sg.grad[2]).all()
    assert torch.all(sg.grad[3] == 0) and torch.isfinite(sg.grad[0]).all()
