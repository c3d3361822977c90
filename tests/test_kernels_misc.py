"""Small kernels and host helpers: gradient scaling, fast exp/log of the C++ header (through the
cpu backend), dtype round trips."""

import math

import pytest
import torch

from fastdistill import backends
from util import DTYPES, cases, logits


def _scale_rows(backend):
    if backend == "triton":
        from fastdistill.kernels.scale import scale_rows_
    elif backend == "cuda":
        from fastdistill.backends.cuda_backend import scale_rows_
    else:
        from emu_backend import scale_rows_
    return scale_rows_


@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES, only=("triton", "cuda",
                                                                      "cuda_emu")))
def test_scale_rows_kernels(device, backend, dtype):
    """The in-place backward scaling (grad_output): per row, by a scalar, and skipped where
    the factor is exactly 1; a misaligned view takes the scalar path with the same values."""
    scale_rows_ = _scale_rows(backend)
    g = logits((5, 1003), dtype, device=torch.device(device))
    for f in (torch.tensor([1.0, 2.0, -0.5, 1.0, 3.0]), torch.tensor(0.25), torch.tensor(1.0)):
        f = f.to(device)
        got = g.clone()
        scale_rows_(got, f)
        assert torch.equal(got, (g.float() * (f[:, None] if f.dim() else f)).to(dtype))
    big = logits((5, 1010), dtype, device=torch.device(device))
    view = big[:, 3:1006]
    want = (view.float() * 2.0).to(dtype)
    scale_rows_(view, torch.tensor(2.0, device=device))
    assert torch.equal(view, want)


def test_eager_scale_grad_bumps_version():
    from fastdistill.ops import scale_grad_
    g = torch.randn(3, 4)
    v = g._version
    scale_grad_(g, torch.tensor(1.0))
    assert g._version > v


@pytest.mark.skipif(not backends.check("cpu", torch.device("cpu"))[0], reason="no extension")
def test_cpu_kernel_exp_accuracy_over_the_range():
    """The polynomial exp in the C++ header, seen through softmax values: one hot column with
    logit x against zeros gives q = e^x / (e^x + V - 1). Checked over the whole exponent
    range, including where it flushes to zero."""
    import fastdistill as fd
    V = 9
    xs = torch.tensor([-100.0, -87.0, -80.0, -30.0, -3.3, -0.5, 0.0, 0.7, 5.0, 40.0, 80.0])
    s = torch.zeros(len(xs), V)
    s[:, 0] = xs
    t = torch.zeros(len(xs), V)  # uniform teacher
    sg = s.clone().requires_grad_()
    fd.distill_loss(sg, t, reduction="sum", backend="cpu").backward()
    q0 = sg.grad[:, 0] + 1.0 / V  # grad = q - p with p = 1/V
    x64 = xs.double()
    want = torch.exp(x64 - torch.logsumexp(torch.stack([x64, torch.full_like(x64, math.log(V - 1))]), 0))
    torch.testing.assert_close(q0.double(), want, rtol=2e-6, atol=2e-7)
