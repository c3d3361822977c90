"""Property tests (hypothesis): random shapes, dtypes, layouts, options, masks and special values
(NaN, +-inf, huge, tiny) for distill_loss, linear_distill_loss and feature_loss against the
float64 references, under the rules of RELIABILITY.md.

Examples are drawn from a fixed seed (the "ci" profile of conftest.py: derandomized, a fixed
number of examples per backend); a failure prints the falsifying example and a reproduction
blob (@reproduce_failure). HYPOTHESIS_PROFILE=dev draws fresh, more numerous examples."""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastdistill as fd  # noqa: E402
from fastdistill.reference import (reference_distill_loss,  # noqa: E402
                                   reference_feature_loss, reference_linear_distill_loss)
from util import cpu_backends  # noqa: E402

EPS = 2.0 ** -24
DTYPE_EPS = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# gradients written in float16 flush below its smallest subnormal
DTYPE_TINY = {torch.float32: 0.0, torch.float16: 2.0 ** -24, torch.bfloat16: 0.0}
# examples per backend: the interpreter runs programs one at a time, the emulation one thread
EXAMPLES = {"torch": 60, "cpu": 60, "triton": 10, "cuda_emu": 10}
BACKENDS = [b for b in cpu_backends() if b in EXAMPLES]


def per_backend(backend):
    """The backend's example count, times the profile's (ci: 100 -> x1, dev: 300 -> x3)."""
    n = EXAMPLES[backend] * max(1, settings.default.max_examples // 100)
    return settings(settings.default, max_examples=n,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def logit_problems(draw, backend):
    """(student, teacher, labels, mask, options) with the leading shape, layout and special
    values drawn; small enough for every backend."""
    small = backend in ("triton", "cuda_emu")
    lead = draw(st.sampled_from([(1,), (3,), (5,), (2, 3), (1, 4)]))
    V = draw(st.integers(1, 70 if small else 300))
    dtypes = [torch.float32, torch.float16] + ([] if backend == "triton" else [torch.bfloat16])
    sd, td = draw(st.sampled_from(dtypes)), draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([1.0, 3.0, 30.0, 300.0, 3e4]))
    if scale > 1e3 and (sd != torch.float32 or td != torch.float32):
        scale = 300.0  # 16-bit logits do not reach 3e4 with useful precision anyway
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    s64 = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    t64 = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    N = math.prod(lead)
    for x in (s64, t64):  # special values at random places
        flat = x.view(-1)
        for value in draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 1e-40,
                                                    -3e4]), max_size=3)):
            flat[draw(st.integers(0, flat.numel() - 1))] = value
        if draw(st.booleans()):  # a whole -inf block or row
            r = draw(st.integers(0, N - 1))
            lo = draw(st.integers(0, V - 1))
            x.view(N, V)[r, lo:draw(st.integers(lo, V))] = -math.inf
    layout = draw(st.sampled_from(["contiguous", "row_stride", "offset"]))
    s, t = s64.to(sd), t64.to(td)
    if layout == "row_stride":  # the same values in a wider buffer
        big = torch.zeros(*lead, V + 3, dtype=sd)
        big[..., :V] = s
        s = big[..., :V]
    elif layout == "offset":  # rows starting at an odd element
        big = torch.zeros(*lead, V + 1, dtype=sd)
        big[..., 1:] = s
        s = big[..., 1:]
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < 0.3] = -100
    use_labels = draw(st.booleans())
    mask = (torch.rand(lead, generator=g) < 0.8) if draw(st.booleans()) else None
    divergence = draw(st.sampled_from(fd.DIVERGENCES))
    reduction = draw(st.sampled_from(["mean", "sum", "none", "batchmean"]))
    opts = dict(divergence=divergence,
                beta=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
                ratio=draw(st.sampled_from([0.0, 0.3, 1.0])),
                temperature=draw(st.sampled_from([0.1, 0.7, 1.0, 2.5])),
                t2_scale=draw(st.booleans()),
                hard_weight=draw(st.sampled_from([0.0, 0.4])) if use_labels else 0.0,
                soft_weight=draw(st.sampled_from([0.0, 0.5, 1.0])),
                reduction=reduction,
                student_logit_scale=draw(st.sampled_from([None, 0.5, 2.0])),
                teacher_logit_scale=draw(st.sampled_from([None, 1.5])),
                shift_labels=draw(st.booleans()) and lead[-1] > 1)
    return s, t, labels if use_labels else None, mask, opts


def _rows(x, opts):
    """The rows a loss with these options sees (shift_labels drops each sequence's last)."""
    if opts.get("shift_labels"):
        x = x[..., :-1, :]
    return x.reshape(-1, x.shape[-1])


def check_against_reference(loss, grad, ref, ref_grad, ref_rows, s, t, labels, mask, opts):
    """RELIABILITY.md: the loss agrees with float64 (NaN / inf included); each gradient row is
    NaN where the row has no distribution or an infinite reverse-KL term, else within the
    documented bound; rows that do not count are exactly 0."""
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    T = opts["temperature"]
    sm = (opts["student_logit_scale"] or 1.0) / T
    tm = (opts["teacher_logit_scale"] or 1.0) / T
    a, b = _rows(s.double(), opts) * sm, _rows(t.double(), opts) * tm
    g, rg = _rows(grad.double(), opts), _rows(ref_grad, opts)
    with torch.no_grad():
        lq, lp = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        q, p = lq.exp(), lp.exp()
        L = float(torch.nan_to_num(torch.cat([a, b]).abs(), posinf=0.0, neginf=0.0).max()) + 1
        ratio = torch.nan_to_num((lq - lp).abs(), nan=0.0, posinf=2 * L).clamp(max=2 * L)
    for r in range(g.shape[0]):
        if torch.all(g[r] == 0) and torch.all(torch.nan_to_num(rg[r]) == 0):
            continue  # a row that does not count, or a loss that does not depend on it
        bad_row = not (torch.isfinite(torch.logsumexp(a[r], -1))
                       and torch.isfinite(torch.logsumexp(b[r], -1)))
        if bad_row or torch.isnan(ref_rows[r]) or torch.isnan(rg[r]).any() or \
                torch.isinf(rg[r]).any():
            assert torch.isnan(g[r]).all(), f"row {r}: a NaN gradient row expected"
            continue
        if opts["divergence"] == "tvd" and ((p[r] - q[r]).abs() < 1e-6).any():
            continue  # tvd's gradient jumps where p == q
        weight = opts["soft_weight"] * (T * T if opts["t2_scale"] else 1.0) * sm + \
            opts["hard_weight"] * (opts["student_logit_scale"] or 1.0)
        bound = (16 * EPS * L * (p[r] + q[r] + torch.softmax(a[r] * T, -1)) * (1 + ratio[r])
                 * weight + (8 * EPS + 4 * DTYPE_EPS[grad.dtype]) * rg[r].abs()
                 + DTYPE_TINY[grad.dtype] + 1e-12)
        err = (g[r] - rg[r]).abs()
        assert torch.all(err <= bound), \
            f"row {r}: gradient error {float((err / bound).max()):.2f} x the bound"


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_loss_properties(backend):
    @per_backend(backend)
    @given(logit_problems(backend))
    def prop(problem):
        s, t, labels, mask, opts = problem
        sg = s.detach().clone().requires_grad_()
        try:
            loss = fd.distill_loss(sg, t, labels, mask=mask, backend=backend, **opts)
        except ValueError as e:  # refused input: must say which argument and why
            assert any(k in str(e) for k in ("hard_weight", "labels", "mask", "shift_labels"))
            return
        s64 = s.detach().double().requires_grad_()
        ref = reference_distill_loss(s64, t.double(), labels, mask=mask, **opts)
        go = torch.rand(ref.shape, dtype=torch.float64) + 0.5 if ref.dim() else \
            torch.ones((), dtype=torch.float64)
        loss.backward(go.float())
        if ref.requires_grad:
            ref.backward(go)
        ref_grad = s64.grad if s64.grad is not None else torch.zeros_like(s64)
        with torch.no_grad():  # a row whose loss is NaN has a NaN gradient (RELIABILITY.md)
            ref_rows = reference_distill_loss(s.double(), t.double(), labels, mask=mask,
                                              **dict(opts, reduction="none")).reshape(-1)
        check_against_reference(loss.detach(), sg.grad, ref.detach(), ref_grad, ref_rows, s, t,
                                labels, mask, opts)

    prop()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda_emu"])
def test_linear_distill_loss_properties(backend):
    mode = "fused" if backend == "triton" else "chunked"

    @per_backend(backend)
    @given(st.data())
    def prop(data):
        N = data.draw(st.integers(1, 9))
        Ds, Dt = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 24))
        V = data.draw(st.integers(1, 40))
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
        hs = torch.randn(N, Ds, generator=g, dtype=torch.float64)
        ws = torch.randn(V, Ds, generator=g, dtype=torch.float64)
        ht = torch.randn(N, Dt, generator=g, dtype=torch.float64)
        wt = torch.randn(V, Dt, generator=g, dtype=torch.float64)
        labels = torch.randint(0, V, (N,), generator=g)
        labels[torch.rand(N, generator=g) < 0.3] = -100
        counted = (labels != -100).nonzero().flatten().tolist()
        if counted and data.draw(st.booleans()):  # a NaN hidden state in a counted row
            # (in a row that does not count it would still reach grad_weight through the
            # GEMM, 0 x NaN, as in any PyTorch linear layer)
            hs[data.draw(st.sampled_from(counted)), 0] = math.nan
        opts = dict(divergence=data.draw(st.sampled_from(fd.DIVERGENCES)), beta=0.3, ratio=0.6,
                    temperature=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
                    hard_weight=data.draw(st.sampled_from([0.0, 0.5])),
                    reduction=data.draw(st.sampled_from(["mean", "sum", "none"])),
                    student_softcap=data.draw(st.sampled_from([None, 5.0])),
                    chunk_size=data.draw(st.sampled_from([None, 1, 4])))
        leaves = [x.float().requires_grad_() for x in (hs, ws)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht.float(), wt.float(), labels,
                                      backend=backend, mode=mode, **opts)
        r_leaves = [x.float().double().requires_grad_() for x in (hs, ws)]
        opts.pop("chunk_size")
        ref = reference_linear_distill_loss(r_leaves[0], r_leaves[1], ht.float(), wt.float(),
                                            labels, **opts)
        torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)
        if torch.isfinite(ref).all():
            loss.backward(torch.ones_like(loss))
            ref.backward(torch.ones_like(ref))
            for a, b in zip(leaves, r_leaves):
                torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-4)

    prop()


def gradient_terms(s, t, kind):
    """|first| + |second| term of the feature gradient cs (s - ms) + ct (t - mt), per element
    (float64): the scale of its rounding error."""
    D = s.shape[-1]
    if kind == "mse":
        return 2.0 / D * (s.abs() + t.abs())
    if kind == "cosine":
        ns = s.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        nt = t.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return s.abs() / (ns * ns) + t.abs() / (ns * nt)
    sc, tc = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    vs = (sc * sc).mean(-1, keepdim=True) + 1e-5
    vt = (tc * tc).mean(-1, keepdim=True) + 1e-5
    return 2.0 / D * (sc.abs() / vs + tc.abs() / (vs * vt).sqrt()) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_loss_properties(backend):
    @per_backend(backend)
    @given(st.data())
    def prop(data):
        lead = data.draw(st.sampled_from([(1,), (4,), (2, 3)]))
        D = data.draw(st.integers(1, 48))
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16] +
                                          ([] if backend == "triton" else [torch.bfloat16])))
        s = (torch.randn(*lead, D, generator=g) * data.draw(st.sampled_from([1e-3, 1.0, 50.0]))
             ).to(dtype)
        t = torch.randn(*lead, D, generator=g).to(dtype)
        if data.draw(st.booleans()):
            s.view(-1)[data.draw(st.integers(0, s.numel() - 1))] = math.nan
        if data.draw(st.booleans()):
            s.view(-1, D)[0] = 0.0  # a zero row: the cosine clamp
        mask = (torch.rand(lead, generator=g) < 0.7) if data.draw(st.booleans()) else None
        kind = data.draw(st.sampled_from(fd.FEATURE_KINDS))
        reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
        sg = s.clone().requires_grad_()
        loss = fd.feature_loss(sg, t, kind=kind, mask=mask, reduction=reduction, backend=backend)
        s64 = s.double().requires_grad_()
        ref = reference_feature_loss(s64, t.double(), kind=kind, mask=mask, reduction=reduction)
        torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
        loss.backward(torch.ones_like(loss))
        ref.backward(torch.ones_like(ref))
        # the reference gradient rounded to the student's dtype (overflow to inf included:
        # the cosine gradient of a zero row is 1e8 / |t|)
        rows, refrows = sg.grad.reshape(-1, D).double(), s64.grad.reshape(-1, D).to(dtype).double()
        terms = gradient_terms(s.double().reshape(-1, D), t.double().reshape(-1, D), kind)
        for r in range(rows.shape[0]):
            if torch.isnan(refrows[r]).any():
                assert torch.isnan(rows[r]).all(), "a row with a NaN: NaN gradient"
            else:  # the gradient is a difference of terms (and of row sums shared by every
                # element, which round at the scale of the row's largest gradient)
                big = refrows[r].abs().max() if torch.isfinite(refrows[r]).all() else 0.0
                bound = 16 * EPS * (terms[r] + big) + 4 * DTYPE_EPS[dtype] * refrows[r].abs() \
                    + 1e-7
                assert torch.all(((rows[r] - refrows[r]).abs() <= bound) |
                                 (rows[r] == refrows[r]))

    prop()
