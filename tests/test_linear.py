"""linear_distill_loss (chunked on every backend, fused through the Triton interpreter) against
the float64 reference that materialises the logits."""

import math

import pytest
import torch

import fastdistill as fd
from fastdistill.divergences import reference_distill_loss
from util import assert_close, cpu_backends

BACKENDS = cpu_backends()
# (mode, backend) pairs that run here; fused needs the triton backend
MODES = [("chunked", b) for b in BACKENDS] + \
    ([("fused", "triton")] if "triton" in BACKENDS else [])
LOSS_TOL = dict(rtol=3e-5, atol=3e-5)
GRAD_TOL = dict(rtol=3e-4, atol=3e-6)


def make(N=11, Ds=24, Dt=40, V=53, Vs=None, Vt=None, lead=None, dtype=torch.float32, bias=True,
         teacher_bias=False):
    g = torch.Generator().manual_seed(7)
    Vs, Vt = Vs or V, Vt or V
    shape = lead or (N,)
    hs = torch.randn(*shape, Ds, generator=g).to(dtype)
    ws = (torch.randn(Vs, Ds, generator=g) / Ds ** 0.5 * 3).to(dtype)
    bs = torch.randn(Vs, generator=g).to(dtype) if bias else None
    ht = torch.randn(*shape, Dt, generator=g).to(dtype)
    wt = (torch.randn(Vt, Dt, generator=g) / Dt ** 0.5 * 3).to(dtype)
    bt = torch.randn(Vt, generator=g).to(dtype) if teacher_bias else None
    labels = torch.randint(0, V, shape, generator=g)
    return hs, ws, bs, ht, wt, bt, labels


def reference(hs, ws, bs, ht, wt, bt, labels, teacher_logits=None, student_softcap=None,
              teacher_softcap=None, **kw):
    zs = hs.double() @ ws.double().t()
    if bs is not None:
        zs = zs + bs.double()
    if student_softcap:
        zs = student_softcap * torch.tanh(zs / student_softcap)
    if teacher_logits is None:
        zt = ht.double() @ wt.double().t()
        if bt is not None:
            zt = zt + bt.double()
    else:
        zt = teacher_logits.double()
    if teacher_softcap:
        zt = teacher_softcap * torch.tanh(zt / teacher_softcap)
    return reference_distill_loss(zs, zt, labels, **kw)


def check(mode, backend, hs, ws, bs, ht, wt, bt, labels, grad_out=None, loss_tol=LOSS_TOL,
          grad_tol=GRAD_TOL, teacher_logits=None, chunk_size=None, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None
              for x in (hs, ws, bs)]
    loss = fd.linear_distill_loss(
        leaves[0], leaves[1], None if teacher_logits is not None else ht,
        None if teacher_logits is not None else wt, labels, student_bias=leaves[2],
        teacher_bias=None if teacher_logits is not None else bt, teacher_logits=teacher_logits,
        backend=backend, mode=mode, chunk_size=chunk_size, **kw)
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None
                  for x in (hs, ws, bs)]
    ref = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ht, wt, bt, labels,
                    teacher_logits=teacher_logits, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype))
    ref.backward(grad_out.double())
    what = f"{mode}/{backend} {kw}"
    assert loss.dtype == torch.float32
    assert_close(loss, ref, **loss_tol, what=f"loss {what}")
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if a is not None:
            assert a.grad.dtype == a.dtype
            assert_close(a.grad, b.grad, **grad_tol, what=f"grad {name} {what}")
    return loss, leaves


DIV_BETA = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0),
            ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.7), ("tvd", 0.5)]


@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("divergence,beta", DIV_BETA)
def test_divergences(mode, backend, divergence, beta):
    hs, ws, bs, ht, wt, bt, labels = make()
    labels[2] = -100
    check(mode, backend, hs, ws, bs, ht, wt, bt, labels, divergence=divergence, beta=beta,
          temperature=1.7, hard_weight=0.4, t2_scale=True, chunk_size=4)


@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_softcap_biases(mode, backend, reduction):
    hs, ws, bs, ht, wt, bt, labels = make(teacher_bias=True)
    labels[::3] = -100
    go = torch.rand(labels.shape) + 0.5 if reduction == "none" else torch.tensor(1.3)
    loss, _ = check(mode, backend, hs, ws, bs, ht, wt, bt, labels, grad_out=go,
                    reduction=reduction, student_softcap=4.0, teacher_softcap=6.0,
                    divergence="jsd", hard_weight=0.5, temperature=1.0, chunk_size=5)
    if reduction == "none":
        assert torch.all(loss.detach()[labels == -100] == 0)


@pytest.mark.parametrize("mode,backend", MODES)
def test_padded_vocabularies(mode, backend):
    """Student 61 columns, teacher 57, real vocabulary 50: padding never matters."""
    hs, ws, bs, ht, wt, bt, labels = make(V=50, Vs=61, Vt=57)
    _, leaves = check(mode, backend, hs, ws, bs, ht, wt, bt, labels, vocab_size=50,
                      divergence="forward_kl", hard_weight=0.3, temperature=2.0)
    assert torch.all(leaves[1].grad[50:] == 0) and torch.all(leaves[2].grad[50:] == 0)


@pytest.mark.parametrize("mode,backend", MODES)
def test_dense_teacher_logits(mode, backend):
    hs, ws, bs, ht, wt, bt, labels = make()
    t_logits = (ht @ wt.t()) * 1.5
    kept = t_logits.clone()
    check(mode, backend, hs, ws, bs, None, None, None, labels, teacher_logits=t_logits,
          divergence="reverse_kl", teacher_softcap=5.0, hard_weight=0.2)
    assert torch.equal(t_logits, kept), "the teacher's logits must not be modified"


@pytest.mark.parametrize("mode,backend", MODES)
def test_shapes_odd_sizes_and_leading_dims(mode, backend):
    # D and V not multiples of any tile, 3-D inputs, one token
    hs, ws, bs, ht, wt, bt, labels = make(Ds=19, Dt=33, V=37, lead=(2, 3))
    check(mode, backend, hs, ws, bs, ht, wt, bt, labels, divergence="skew_forward_kl",
          beta=0.4, reduction="none", chunk_size=4)
    hs, ws, bs, ht, wt, bt, labels = make(N=1, V=45)
    check(mode, backend, hs, ws, bs, ht, wt, bt, labels, divergence="tvd")


@pytest.mark.parametrize("mode,backend", MODES)
def test_fp16_inputs(mode, backend):
    hs, ws, bs, ht, wt, bt, labels = make(dtype=torch.float16)
    check(mode, backend, hs, ws, bs, ht, wt, bt, labels, divergence="forward_kl",
          hard_weight=0.5, grad_tol=dict(rtol=2e-3, atol=2e-4))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in BACKENDS])
def test_bf16_chunked(backend):
    """bf16 weights and hidden states; the logits are formed in float32, never rounded."""
    hs, ws, bs, ht, wt, bt, labels = make(dtype=torch.bfloat16, V=300)
    check("chunked", backend, hs, ws, bs, ht, wt, bt, labels, divergence="jsd",
          grad_tol=dict(rtol=1e-2, atol=2e-4))


@pytest.mark.parametrize("mode,backend", MODES)
def test_chunk_size_does_not_change_the_result(mode, backend):
    hs, ws, bs, ht, wt, bt, labels = make(N=17)
    res = []
    for c in (1, 6, 17, 1000):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2],
                                      backend=backend, mode=mode, chunk_size=c,
                                      divergence="jsd", hard_weight=0.5)
        loss.backward()
        res.append([loss.detach()] + [x.grad for x in leaves])
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            assert_close(a, b, rtol=1e-5, atol=1e-7, what="chunk size")


@pytest.mark.parametrize("mode,backend", MODES)
def test_all_ignored_and_no_grad(mode, backend):
    hs, ws, bs, ht, wt, bt, labels = make()
    h = hs.clone().requires_grad_()
    loss = fd.linear_distill_loss(h, ws, ht, wt, torch.full_like(labels, -100), hard_weight=1.0,
                                  backend=backend, mode=mode)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(h.grad == 0)
    with torch.no_grad():
        a = fd.linear_distill_loss(hs, ws, ht, wt, labels, backend=backend, mode=mode)
    b = fd.linear_distill_loss(hs, ws, ht, wt, labels, backend=backend, mode=mode)
    assert_close(a, b.detach(), rtol=1e-6, atol=1e-7, what="no-grad forward")


@pytest.mark.parametrize("mode,backend", MODES)
def test_deterministic(mode, backend):
    hs, ws, bs, ht, wt, bt, labels = make()
    out = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, backend=backend,
                                      mode=mode, divergence="tvd", hard_weight=0.2)
        loss.backward()
        out.append([loss.detach()] + [x.grad for x in leaves])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_module():
    hs, ws, bs, ht, wt, bt, labels = make(lead=(2, 4))
    mod = fd.LinearDistillLoss(divergence="jsd", temperature=2.0, hard_weight=0.5)
    a = mod(hs, ws, ht, wt, labels, student_bias=bs)
    b = fd.linear_distill_loss(hs, ws, ht, wt, labels, student_bias=bs, divergence="jsd",
                               temperature=2.0, hard_weight=0.5)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="unknown option"):
        fd.LinearDistillLoss(temprature=2.0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton interpreter")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_liger_fused_linear_jsd(beta):
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd",
                                reason="Liger-Kernel not installed")
    hs, ws, _, ht, wt, _, labels = make(N=8, Ds=32, Dt=32, V=64, bias=False)
    labels[1] = -100
    a = hs.clone().requires_grad_()
    wa = ws.clone().requires_grad_()
    ours = fd.linear_distill_loss(a, wa, ht, wt, labels, divergence="jsd", beta=beta,
                                  temperature=2.0, backend="cpu" if "cpu" in BACKENDS else "torch")
    ours.backward()
    b = hs.clone().requires_grad_()
    wb = ws.clone().requires_grad_()
    theirs = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=2.0)(b, wb, ht, wt, labels)
    theirs.backward()
    assert_close(ours, theirs, rtol=1e-4, atol=1e-5, what="loss vs LigerFusedLinearJSD")
    assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, what="hidden grad vs Liger")
    assert_close(wa.grad, wb.grad, rtol=1e-3, atol=1e-5, what="weight grad vs Liger")


def test_bad_input():
    hs, ws, bs, ht, wt, bt, labels = make()
    f = fd.linear_distill_loss
    with pytest.raises(ValueError, match=r"student_weight has 23 input features"):
        f(hs, ws[:, :23], ht, wt)
    with pytest.raises(ValueError, match=r"teacher_weight has 39 input features"):
        f(hs, ws, ht, wt[:, :39])
    with pytest.raises(ValueError, match="pass vocab_size"):
        f(hs, ws, ht, wt[:50])
    with pytest.raises(ValueError, match="teacher_hidden has leading shape"):
        f(hs, ws, ht[:5], wt)
    with pytest.raises(ValueError, match="not both"):
        f(hs, ws, ht, wt, teacher_logits=torch.randn(11, 53))
    with pytest.raises(ValueError, match="the teacher is needed"):
        f(hs, ws)
    with pytest.raises(ValueError, match="must be a 2-D"):
        f(hs, ws[0], ht, wt)
    with pytest.raises(ValueError, match=r"student_bias must have shape \[53\]"):
        f(hs, ws, ht, wt, student_bias=torch.zeros(52))
    with pytest.raises(ValueError, match="student_softcap must be a positive"):
        f(hs, ws, ht, wt, student_softcap=0.0)
    with pytest.raises(TypeError, match="teacher_softcap must be a positive number"):
        f(hs, ws, ht, wt, teacher_softcap="30")
    with pytest.raises(ValueError, match="mode must be one of"):
        f(hs, ws, ht, wt, mode="tiled")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have the logits' leading shape"):
        f(hs, ws, ht, wt, labels[:4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        f(hs, ws, ht, wt, torch.full_like(labels, 60), hard_weight=1.0)
    with pytest.raises(fd.BackendUnavailableError, match="mode='fused' runs on the triton"):
        f(hs, ws, ht, wt, backend="torch", mode="fused")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        f(hs, ws, ht, wt, temperature=-1.0)
    with pytest.raises(ValueError, match="student_weight is on meta but student_hidden is on cpu"):
        f(hs, ws.to("meta"), ht, wt)
    with pytest.raises(ValueError, match="teacher_bias is on meta but student_hidden is on cpu"):
        f(hs, ws, ht, wt, teacher_bias=torch.zeros(53, device="meta"))
    assert math.isfinite(float(f(hs, ws, ht, wt, labels)))
