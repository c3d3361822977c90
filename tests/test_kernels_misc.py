"""Small kernels and host helpers: gradient scaling, fast exp/log of the C++ header (through the
cpu backend), dtype round trips."""

import math

import pytest
import torch

from fastdistill import backends
from util import cpu_backends

TRITON = "triton" in cpu_backends()


@pytest.mark.skipif(not TRITON, reason="triton not installed")
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_rows_kernel(per_row, dtype):
    from fastdistill.kernels.scale import scale_rows_
    g = torch.randn(5, 150).to(dtype)
    f = torch.tensor([1.0, 2.0, -0.5, 1.0, 3.0]) if per_row else torch.tensor(0.25)
    want = (g.float() * (f[:, None] if per_row else f)).to(dtype)
    got = g.clone()
    scale_rows_(got, f)
    assert torch.equal(got, want)
    one = g.clone()
    scale_rows_(one, torch.tensor(1.0))
    assert torch.equal(one, g)


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


@pytest.mark.parametrize("backend", cpu_backends())
def test_out_of_range_label_below_the_api(backend):
    """What the kernels do with a label the API would reject (on a GPU it is not checked, to
    avoid a host sync): NaN loss and zero gradient for that row only; others unaffected."""
    from fastdistill import backends as be
    from fastdistill.divergences import make_options
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    labels = torch.tensor([5, 40, -100])
    opts = make_options(hard_weight=0.5)
    rows, grad = be.get(backend).distill_forward(s, t, labels, opts, 40, torch.tensor(1.0), True)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1]) and rows[2] == 0
    assert torch.all(grad[1] == 0) and torch.all(grad[2] == 0) and grad[0].abs().sum() > 0
