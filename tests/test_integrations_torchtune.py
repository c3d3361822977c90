"""fastdistill's fused linear loss against torchtune's chunked KD losses (torchtune 0.6.1), as its
knowledge-distillation recipe computes them from full logits chunked along the sequence."""

import pytest
import torch

pytest.importorskip("torchao")
kd = pytest.importorskip("torchtune.modules.loss")

import fastdistill as fd  # noqa: E402


def problem(seed=0, B=3, T=10, Ds=12, Dt=20, V=70):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, Ds, generator=g)
    w_s = torch.randn(V, Ds, generator=g) * 0.4
    h_t = torch.randn(B, T, Dt, generator=g)
    w_t = torch.randn(V, Dt, generator=g) * 0.4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, 7:] = -100
    return h_s, w_s, h_t, w_t, labels


def chunks(x, n):
    return list(x.chunk(n, dim=1))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_reverse_kl_matches_torchtune(backend):
    if not fd.backends.check(backend, torch.device("cpu"))[0]:
        pytest.skip(f"backend {backend} not built")
    h_s, w_s, h_t, w_t, labels = problem()
    a, wa = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ours = fd.linear_distill_loss(a, wa, h_t, w_t, labels, divergence="reverse_kl",
                                  backend=backend)
    ours.backward()
    b, wb = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    theirs = kd.ReverseKLWithChunkedOutputLoss(num_output_chunks=4)(
        chunks(b @ wb.t(), 4), chunks(h_t @ w_t.t(), 4), labels)
    theirs.backward()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(wa.grad, wb.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_kl_matches_torchtune(backend):
    """torchtune's ForwardKL is the cross-entropy -sum P log Q, i.e. KL(P||Q) plus the teacher's
    entropy: the same gradient, values apart by the mean teacher entropy."""
    if not fd.backends.check(backend, torch.device("cpu"))[0]:
        pytest.skip(f"backend {backend} not built")
    h_s, w_s, h_t, w_t, labels = problem(seed=1)
    a, wa = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ours = fd.linear_distill_loss(a, wa, h_t, w_t, labels, divergence="forward_kl",
                                  backend=backend)
    ours.backward()
    b, wb = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    zt = h_t @ w_t.t()
    theirs = kd.ForwardKLWithChunkedOutputLoss(num_output_chunks=5)(
        chunks(b @ wb.t(), 5), chunks(zt, 5), labels)
    theirs.backward()
    lp = torch.log_softmax(zt.double(), -1)
    ent = -(lp.exp() * lp).sum(-1)
    valid = labels != -100
    mean_entropy = float(ent[valid].mean())
    assert float(ours) + mean_entropy == pytest.approx(float(theirs), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    assert torch.allclose(wa.grad, wb.grad, atol=1e-6, rtol=1e-4)
