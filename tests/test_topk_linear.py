"""linear_distill_loss(student_hidden, student_weight, None, None, labels, teacher_topk=...):
the chunked linear loss with the top-k row kernel of every backend, against the float64
reference on explicit logits."""

import pytest
import torch

import fastdistill as fd
from fastdistill.reference import reference_logits, reference_topk_distill_loss
from util import BF16, F32, assert_close, cases, small

from test_topk import teacher


def sizes(backend, device):
    """(N, V, D, K)"""
    if device == "cuda":
        return 40, 1013, 72, 32
    return (5, 97, 12, 6) if small(backend, device) else (9, 211, 24, 11)


def _inputs(N, V, D, dtype, device, bias=True):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (3.0 / D ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    cast = lambda x: x.to(device=device, dtype=dtype) if x is not None else None  # noqa: E731
    return cast(h), cast(w), cast(b)


def _run(backend, h, w, b, topk, labels, grad_out=None, **kw):
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    bs = b.clone().requires_grad_() if b is not None else None
    loss = fd.linear_distill_loss(hs, ws, None, None, labels, teacher_topk=topk,
                                  student_bias=bs, backend=backend, **kw)
    h64, w64 = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    b64 = b.double().cpu().requires_grad_() if b is not None else None
    cap, scale = kw.pop("student_softcap", None), kw.pop("student_logit_scale", None)
    kw.pop("chunk_size", None)
    z = reference_logits(h64, w64, b64, cap, scale)
    ref = reference_topk_distill_loss(z, topk[0].cpu(), topk[1].cpu(),
                                      labels.cpu() if labels is not None else None, **kw)
    g = torch.ones_like(ref) if grad_out is None else grad_out.double().cpu()
    loss.backward(g.to(loss.device, torch.float32))
    ref.backward(g)
    return (loss, ref), [(hs.grad, h64.grad), (ws.grad, w64.grad)] + \
        ([(bs.grad, b64.grad)] if b is not None else [])


def tol(dtype):
    return (dict(rtol=1e-4, atol=1e-5), dict(rtol=2e-4, atol=2e-5)) if dtype == F32 else \
        (dict(rtol=2e-2, atol=2e-3), dict(rtol=5e-2, atol=5e-3))


@pytest.mark.parametrize("device,backend,dtype", cases(dtypes=(F32, BF16)))
@pytest.mark.parametrize("tail", fd.config.TOPK_TAILS)
def test_linear_topk(device, backend, dtype, tail):
    N, V, D, K = sizes(backend, device)
    h, w, b = _inputs(N, V, D, dtype, device)
    topk = teacher(N, V, K, T=2.0, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = -100
    lt, gt = tol(dtype)
    for kw in (dict(divergence="forward_kl", temperature=2.0, hard_weight=0.3),
               dict(divergence="jsd", beta=0.3, student_softcap=5.0, student_logit_scale=1.5,
                    chunk_size=3),
               dict(divergence="reverse_kl", reduction="none", chunk_size=4)):
        go = torch.rand(N, device=device) + 0.5 if kw.get("reduction") == "none" else None
        (loss, ref), grads = _run(backend, h, w, b, topk, labels, go, topk_tail=tail, **kw)
        assert_close(loss, ref, **lt, what=f"{backend} {tail} {kw} loss")
        for (got, want), name in zip(grads, ("hidden", "weight", "bias")):
            assert got.dtype == dtype
            assert_close(got, want, **gt, what=f"{backend} {tail} {kw} grad {name}")


def test_linear_topk_module_and_errors():
    N, V, D, K = 6, 50, 8, 5
    h, w, _ = _inputs(N, V, D, F32, "cpu", bias=False)
    topk = teacher(N, V, K)
    crit = fd.LinearDistillLoss(topk_tail="none")
    a = crit(h, w, labels=None, teacher_topk=topk)
    b = fd.linear_distill_loss(h, w, teacher_topk=topk, topk_tail="none")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either teacher_topk or a dense teacher"):
        fd.linear_distill_loss(h, w, h, w, teacher_topk=topk)
    with pytest.raises(ValueError, match="mode='chunked'"):
        fd.linear_distill_loss(h, w, teacher_topk=topk, mode="fused", backend="torch")
    with pytest.raises(ValueError, match="teacher_softcap"):
        fd.linear_distill_loss(h, w, teacher_topk=topk, teacher_softcap=3.0)
    with pytest.raises(ValueError, match="leading shape"):
        fd.linear_distill_loss(h[:3], w, teacher_topk=topk)
