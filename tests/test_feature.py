"""feature_loss (and its projected form) on every backend of both devices against the float64
reference: torch, cpu, triton (interpreter) and the CUDA kernels' source (cuda_emu) on CPU
tensors; torch, cuda and triton on a GPU (gpu-marked)."""

import pytest
import torch
from torch import nn

import fastdistill as fd
from fastdistill.reference import reference_feature_loss
from util import (BF16, DTYPES, F32, GRAD_TOL, LOSS_TOL, assert_close, cases, logits, small,
                  tolerances)

KINDS = fd.FEATURE_KINDS


def run(backend, s, t, proj=None, grad_out=None, **kw):
    sg = s.detach().clone().requires_grad_()
    p = None
    if proj is not None:
        p = proj.detach().clone().requires_grad_() if isinstance(proj, torch.Tensor) else proj
    loss = fd.feature_loss(sg, t, projection=p, backend=backend, **kw)
    s64 = s.detach().double().requires_grad_()
    p64 = None
    if proj is not None:
        if isinstance(proj, torch.Tensor):
            p64 = proj.detach().double().requires_grad_()
        else:
            p64 = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None,
                            dtype=torch.float64, device=proj.weight.device)
            p64.load_state_dict({k: v.double() for k, v in proj.state_dict().items()})
    ref = reference_feature_loss(s64, t, projection=p64, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.float())
    ref.backward(grad_out.double())
    return loss, sg, ref, s64, p, p64


def shape(backend, device):
    if device == "cuda":
        return (9, 3000)
    return (5, 40) if small(backend) else (9, 300)


def make(shape_, dtype, device, scale=1.0):
    return logits(shape_, dtype, scale, device=torch.device(device))


@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kinds_and_reductions(device, backend, dtype, kind, reduction):
    N, D = shape(backend, device)
    s, t = make((N, D), dtype, device), make((N, D), dtype, device) + 0.5
    go = torch.rand(N, device=device) + 0.5 if reduction == "none" else None
    loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind, reduction=reduction, grad_out=go)
    _, grad_tol = tolerances(dtype)
    # 16 bits: the gradient is rounded once in the kernel and, with a per-row grad_output,
    # once more when backward scales it in place
    tol = GRAD_TOL if dtype == F32 else dict(rtol=2 * grad_tol["rtol"], atol=1e-6)
    assert_close(loss, ref, **LOSS_TOL, what=f"{kind} loss")
    assert_close(sg.grad, s64.grad, **tol, what=f"{kind} grad")


@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES, only=("cuda", "cuda_emu")))
@pytest.mark.parametrize("kind", KINDS)
# 40: one warp; 1000: a partial unit; 8192: the widest row kept in registers; 8200 and 20000:
# streamed rows (the launch paths of csrc/cuda/feature_cuda.cu)
@pytest.mark.parametrize("D", [40, 1000, 8192, 8200, 20000])
def test_cuda_launch_paths(device, backend, dtype, kind, D):
    N = 4
    s, t = make((N, D), dtype, device) + 0.5, make((N, D), dtype, device)
    t[1] = s[1]  # identical rows
    mask = torch.tensor([True, True, False, True], device=device)
    loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind, mask=mask, reduction="none")
    _, grad_tol = tolerances(dtype)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5, what=f"{kind} D={D} loss")
    assert_close(sg.grad, s64.grad, **grad_tol, what=f"{kind} D={D} grad")
    assert loss[2] == 0 and torch.all(sg.grad[2] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("kind", KINDS)
def test_mask(device, backend, dtype, kind):
    N, D = shape(backend, device)
    s, t = make((2, N, D), dtype, device), make((2, N, D), dtype, device)
    mask = torch.rand(2, N, device=device) > 0.4
    mask[0, 0] = False
    loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind, mask=mask)
    assert_close(loss, ref, **LOSS_TOL, what="masked loss")
    assert_close(sg.grad, s64.grad, **GRAD_TOL, what="masked grad")
    assert torch.all(sg.grad[~mask] == 0)
    none = torch.zeros(2, N, dtype=torch.bool, device=device)
    s2 = s.clone().requires_grad_()
    out = fd.feature_loss(s2, t, kind=kind, mask=none, backend=backend)
    out.backward()
    assert float(out.detach()) == 0.0 and torch.all(s2.grad == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("as_module", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_projection(device, backend, dtype, kind, as_module, reduction):
    N, Ds, Dt = (6, 24, 40) if small(backend, device) else (13, 96, 160)
    s, t = make((N, Ds), dtype, device), make((N, Dt), dtype, device)
    if as_module:
        proj = nn.Linear(Ds, Dt, device=device)
    else:
        proj = torch.randn(Dt, Ds, device=device) / Ds ** 0.5
    go = torch.rand(N, device=device) + 0.5 if reduction == "none" else None
    loss, sg, ref, s64, p, p64 = run(backend, s, t, proj, kind=kind, reduction=reduction,
                                     grad_out=go, mask=torch.arange(N, device=device) % 4 != 1)
    assert_close(loss, ref, **LOSS_TOL, what="projected loss")
    assert_close(sg.grad, s64.grad, **GRAD_TOL, what="projected student grad")
    if as_module:
        assert_close(p.weight.grad, p64.weight.grad, **GRAD_TOL, what="projection weight grad")
        assert_close(p.bias.grad, p64.bias.grad, **GRAD_TOL, what="projection bias grad")
    else:
        assert_close(p.grad, p64.grad, **GRAD_TOL, what="projection grad")


def test_projection_in_chunks_equals_one_chunk():
    from fastdistill.feature import projected_feature_loss
    s, t = logits((37, 16), scale=1.0), logits((37, 24), scale=1.0)
    w = torch.randn(24, 16)
    outs = []
    for chunk in (1, 5, 37):
        sg = s.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        projected_feature_loss(sg, t, wg, 2, None, "mean", "cpu", chunk_size=chunk).backward()
        outs.append((sg.grad, wg.grad))
    for g_s, g_w in outs[1:]:
        assert_close(g_s, outs[0][0], rtol=1e-5, atol=1e-7, what="chunked student grad")
        assert_close(g_w, outs[0][1], rtol=1e-5, atol=1e-6, what="chunked weight grad")


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows_multi_tile(device, backend, dtype, kind):
    """Rows wider than the single-tile path (the triton kernel loops over tiles)."""
    D = 200 if small(backend, device) else 9000
    s, t = make((3, D), dtype, device) + 3.0, make((3, D), dtype, device)
    loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind)
    assert_close(loss, ref, **LOSS_TOL, what="wide loss")
    assert_close(sg.grad, s64.grad, **GRAD_TOL, what="wide grad")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_edge_rows(device, backend, dtype):
    """Zero rows (cosine eps clamp), constant rows (normalized eps), identical rows."""
    N, D = shape(backend, device)
    s, t = make((N, D), dtype, device), make((N, D), dtype, device)
    s[0] = 0.0
    t[1] = 0.0
    s[2] = 3.0
    t[3] = s[3]
    for kind in KINDS:
        loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind, reduction="none")
        assert_close(loss, ref, rtol=1e-4, atol=1e-5, what=f"{kind} edge loss")
        assert_close(sg.grad, s64.grad, rtol=1e-4, atol=1e-5, what=f"{kind} edge grad")


@pytest.mark.parametrize("device,backend,dtype", cases((F32, BF16)))
def test_deterministic_misaligned_mixed(device, backend, dtype):
    N, D = shape(backend, device)
    big = make((N, D + 7), dtype, device)
    s = big[:, 3:D + 3]  # misaligned rows
    t = make((N, D), F32, device)
    for kind in KINDS:
        res = []
        for x in (s, s, s.contiguous()):
            sg = x.clone().requires_grad_()
            loss = fd.feature_loss(sg, t, kind=kind, backend=backend)
            loss.backward()
            res.append((loss.detach(), sg.grad))
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
        loss, sg, ref, s64, _, _ = run(backend, s, t, kind=kind)
        assert_close(loss, ref, **LOSS_TOL, what=f"{kind} loss")
        _, grad_tol = tolerances(dtype)
        assert_close(sg.grad, s64.grad, rtol=grad_tol["rtol"], atol=1e-6, what=f"{kind} grad")


def test_bad_input():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="kind must be one of"):
        fd.feature_loss(s, t, kind="l1")
    with pytest.raises(ValueError, match="pass projection"):
        fd.feature_loss(s, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"projection must have shape \[Dt, Ds\] = \[6, 8\]"):
        fd.feature_loss(s, torch.randn(4, 6), projection=torch.randn(8, 6))
    with pytest.raises(TypeError, match="projection must be a"):
        fd.feature_loss(s, torch.randn(4, 6), projection="linear")
    with pytest.raises(ValueError, match="mask must have the features' leading shape"):
        fd.feature_loss(s, t, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fd.feature_loss(s, t, mask=torch.ones(4))
    with pytest.raises(ValueError, match="teacher has leading shape"):
        fd.feature_loss(s, t[:2])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fd.feature_loss(s, t, reduction="avg")
    with pytest.raises(TypeError, match="student must be float32"):
        fd.feature_loss(s.long(), t)
