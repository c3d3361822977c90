"""linear_distill_loss on CUDA tensors, chunked (cuda and triton logit kernels) and fused (the
Triton GEMM kernels at their real GPU tiles: 64-row blocks, 64/128-column tiles, 64-wide K
steps, wgmma on sm_90) against the float64 reference that materialises the logits.

Sizes that exercise the tile paths: N = 160 rows (a partial row block), V = 1013 (odd: a
partial column tile), Ds = 272 and Dt = 333 (not multiples of the 64-wide K step: masked K
tails), bf16 and fp32. Every test carries the gpu mark and is skipped without a CUDA device."""

import pytest
import torch

import fastdistill as fd
from fastdistill.divergences import reference_distill_loss
from util import GPU, assert_close, gpu_backends

gpu = pytest.mark.gpu
BACKENDS = gpu_backends()
# (mode, backend): chunked on every GPU backend, fused on triton
MODES = [pytest.param("chunked", b, id=f"chunked-{b}") for b in BACKENDS] + \
    [pytest.param("fused", "triton", id="fused-triton")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
N, V, DS, DT = 160, 1013, 272, 333


def make(dtype, N=N, V=V, Ds=DS, Dt=DT, seed=11):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(GPU)

    hs, ws, bs = r(N, Ds), r(V, Ds, scale=3 / Ds ** 0.5), r(V)
    ht, wt, bt = r(N, Dt), r(V, Dt, scale=3 / Dt ** 0.5), r(V)
    labels = torch.randint(0, V, (N,), generator=g).to(GPU)
    return hs, ws, bs, ht, wt, bt, labels


def reference(hs, ws, bs, ht, wt, bt, labels, teacher_logits=None, student_softcap=None,
              teacher_softcap=None, **kw):
    zs = hs @ ws.t()
    if bs is not None:
        zs = zs + bs
    if student_softcap:
        zs = student_softcap * torch.tanh(zs / student_softcap)
    if teacher_logits is not None:
        zt = teacher_logits.double()
    else:
        zt = ht.double() @ wt.double().t()
        if bt is not None:
            zt = zt + bt.double()
    if teacher_softcap:
        zt = teacher_softcap * torch.tanh(zt / teacher_softcap)
    return reference_distill_loss(zs, zt, labels, **kw)


def tolerances(dtype):
    """Loss: float32 logits from the same rounded inputs, float32 sums over V. Gradients: the
    logit gradient is staged in the weight dtype (fused) and the results are written in the
    input dtype; bf16 keeps 8 bits, so the comparison is relative to the gradient's scale."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-5), 2e-4
    return dict(rtol=1e-3, atol=1e-4), 2e-2


def check(mode, backend, dtype, hs, ws, bs, ht, wt, bt, labels, teacher_logits=None,
          grad_out=None, chunk_size=None, **kw):
    loss_tol, g_rel = tolerances(dtype)
    leaves = [x.detach().clone().requires_grad_() if x is not None else None
              for x in (hs, ws, bs)]
    dense = teacher_logits is not None
    loss = fd.linear_distill_loss(leaves[0], leaves[1], None if dense else ht,
                                  None if dense else wt, labels, student_bias=leaves[2],
                                  teacher_bias=None if dense else bt,
                                  teacher_logits=teacher_logits, backend=backend, mode=mode,
                                  chunk_size=chunk_size, **kw)
    ref_leaves = [x.detach().double().requires_grad_() if x is not None else None
                  for x in (hs, ws, bs)]
    ref = reference(*ref_leaves, ht, wt, bt, labels, teacher_logits=teacher_logits, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype))
    ref.backward(grad_out.double())
    what = f"{mode}/{backend} {dtype} {kw}"
    assert loss.dtype == torch.float32
    assert_close(loss, ref, **loss_tol, what=f"loss {what}")
    for name, a, r in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype and torch.isfinite(a.grad).all(), (name, what)
        scale = float(r.grad.abs().max()) or 1.0
        assert_close(a.grad, r.grad, rtol=g_rel, atol=g_rel * scale, what=f"grad {name} {what}")
    return loss, leaves


@gpu
@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("tvd", 0.5)])
def test_divergences_softcap_biases_ignored_rows(mode, backend, dtype, divergence, beta):
    hs, ws, bs, ht, wt, bt, labels = make(dtype)
    labels[::7] = -100
    check(mode, backend, dtype, hs, ws, bs, ht, wt, bt, labels, divergence=divergence, beta=beta,
          temperature=1.7, t2_scale=True, hard_weight=0.3, student_softcap=20.0,
          teacher_softcap=25.0, chunk_size=64 if mode == "chunked" else 300)


@gpu
@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduction_none_default_chunks_no_bias(mode, backend, dtype):
    hs, ws, _, ht, wt, _, labels = make(dtype)
    labels[3] = -100
    go = (torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5).to(GPU)
    loss, _ = check(mode, backend, dtype, hs, ws, None, ht, wt, None, labels, grad_out=go,
                    reduction="none", divergence="skew_forward_kl", beta=0.2)
    assert loss.shape == (N,) and float(loss.detach()[3]) == 0.0


@gpu
@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored(mode, backend, dtype):
    hs, ws, bs, ht, wt, bt, labels = make(dtype)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, torch.full_like(labels, -100),
                                  student_bias=leaves[2], teacher_bias=bt, hard_weight=0.5,
                                  divergence="jsd", backend=backend, mode=mode)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for name, x in zip(("hidden", "weight", "bias"), leaves):
        assert torch.all(x.grad == 0), f"grad {name}: expected zeros when every row is ignored"


@gpu
@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_logits(mode, backend, dtype):
    """Precomputed teacher logits, softcapped on a copy (the input is not modified)."""
    hs, ws, bs, ht, wt, bt, labels = make(dtype)
    t = (ht.double() @ wt.double().t() * 1.3).to(dtype)
    labels[5] = -100
    kept = t.clone()
    check(mode, backend, dtype, hs, ws, bs, None, None, None, labels, teacher_logits=t,
          teacher_softcap=15.0, divergence="reverse_kl", hard_weight=0.2, temperature=2.0)
    assert torch.equal(t, kept), "the teacher's logits must not be modified"


@gpu
@pytest.mark.parametrize("mode,backend", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_logits_padding_rows_all_neg_inf(mode, backend, dtype):
    """Ignored padding rows of the teacher's logits that are all -inf (their statistics are
    NaN) change nothing: the loss and every gradient equal those with finite rows there, bit
    for bit, and the padding rows' grad_hidden is exactly 0."""
    hs, ws, bs, ht, wt, bt, labels = make(dtype)
    t = (ht.double() @ wt.double().t() * 1.3).to(dtype)
    pad = [0, 77, N - 1]
    labels[pad] = -100
    t_pad = t.clone()
    t_pad[pad] = float("-inf")
    runs = []
    for teacher in (t_pad, t):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], None, None, labels,
                                      teacher_logits=teacher, student_bias=leaves[2],
                                      divergence="forward_kl", hard_weight=0.2,
                                      temperature=2.0, backend=backend, mode=mode)
        loss.backward()
        runs.append([loss.detach()] + [x.grad for x in leaves])
    padded, finite = runs
    assert all(torch.isfinite(g).all() for g in padded), "NaN from the -inf padding rows"
    assert torch.all(padded[1][pad] == 0)
    for a, b in zip(padded, finite):
        assert torch.equal(a, b), "padding rows changed the loss or the gradient of real rows"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_deterministic_and_equal_to_chunked(dtype):
    hs, ws, bs, ht, wt, bt, labels = make(dtype)
    out = []
    for mode in ("fused", "fused", "chunked"):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, divergence="tvd",
                                      hard_weight=0.2, backend="triton", mode=mode)
        loss.backward()
        out.append([loss.detach()] + [x.grad for x in leaves])
    for a, b in zip(out[0], out[1]):
        assert torch.equal(a, b), "fused mode must be bitwise deterministic"
    loss_tol, g_rel = tolerances(dtype)
    assert_close(out[0][0], out[2][0], **loss_tol, what="fused vs chunked loss")
    for a, b in zip(out[0][1:], out[2][1:]):
        scale = float(b.abs().max()) or 1.0
        assert_close(a, b, rtol=g_rel, atol=g_rel * scale, what="fused vs chunked grads")
