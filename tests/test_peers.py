"""Agreement with independent peers: Liger-Kernel's LigerJSD (through the Triton interpreter)
and torch.nn.functional.kl_div."""

import pytest
import torch

import fastdistill as fd
from util import GRAD_TOL, LOSS_TOL, assert_close, cpu_backends, logits

liger_jsd = pytest.importorskip("liger_kernel.transformers.jsd", reason="Liger-Kernel not installed")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_matches_liger_jsd(backend, beta):
    N, V = 6, 96
    s, t = logits((N, V)), logits((N, V))
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    lt = torch.log_softmax(t, -1)
    # LigerJSD takes log-probabilities and differentiates w.r.t. them as free variables; both
    # sides go through log_softmax so that the gradients w.r.t. the logits are comparable.
    a = s.clone().requires_grad_()
    ours = fd.distill_loss(torch.log_softmax(a, -1), lt, labels, divergence="jsd", beta=beta,
                           backend=backend)
    ours.backward()
    b = s.clone().requires_grad_()
    theirs = liger_jsd.LigerJSD(beta=beta)(torch.log_softmax(b, -1), lt, labels)
    theirs.backward()
    assert_close(ours, theirs, **LOSS_TOL, what="loss vs LigerJSD")
    assert_close(a.grad, b.grad, **GRAD_TOL, what="grad vs LigerJSD")


@pytest.mark.parametrize("backend", cpu_backends())
def test_reverse_kl_matches_kl_div(backend):
    s, t = logits((5, 70)), logits((5, 70))
    a = s.clone().requires_grad_()
    ours = fd.distill_loss(a, t, divergence="reverse_kl", reduction="sum", backend=backend)
    ours.backward()
    b = s.clone().requires_grad_()
    theirs = torch.nn.functional.kl_div(torch.log_softmax(t, -1), torch.log_softmax(b, -1),
                                        log_target=True, reduction="sum")
    theirs.backward()
    assert_close(ours, theirs, **LOSS_TOL, what="reverse_kl vs kl_div")
    assert_close(a.grad, b.grad, **GRAD_TOL, what="reverse_kl grad vs kl_div")
