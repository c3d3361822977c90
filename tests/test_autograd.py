"""Autograd and torch.library behaviour of the losses: grad_output scaling, a single backward,
no-grad use, teacher without gradient, torch.compile and opcheck."""

import pytest
import torch

import fastdistill as fd
from util import GRAD_TOL, LOSS_TOL, assert_close, cpu_backends, logits, run_both

BACKENDS = cpu_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scales_gradient(backend):
    s, t = logits((4, 50)), logits((4, 50))
    go = torch.tensor(-2.5)
    loss, grad, ref, ref_grad = run_both(s, t, None, go, divergence="jsd", backend=backend)
    assert_close(grad, ref_grad, **GRAD_TOL, what="scaled gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_used_twice_in_graph(backend):
    """The loss feeding two branches of the graph: autograd sums the two grad_outputs first."""
    s = logits((3, 40)).requires_grad_()
    t = logits((3, 40))
    loss = fd.distill_loss(s, t, backend=backend)
    (loss * 2 + loss.exp()).backward()
    s2 = s.detach().double().requires_grad_()
    from fastdistill.divergences import reference_distill_loss
    r = reference_distill_loss(s2, t.double())
    (r * 2 + r.exp()).backward()
    assert_close(s.grad, s2.grad, **GRAD_TOL, what="composite backward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises_instead_of_rescaling(backend):
    s = logits((3, 40)).requires_grad_()
    loss = fd.distill_loss(s, logits((3, 40)), backend=backend) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_eval(backend):
    s, t = logits((3, 40)), logits((3, 40))
    ref = fd.distill_loss(s, t, backend=backend)
    sg = s.clone().requires_grad_()
    with torch.no_grad():
        loss = fd.distill_loss(sg, t, backend=backend)
    assert not loss.requires_grad
    assert torch.equal(loss, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(backend):
    s = logits((3, 40)).requires_grad_()
    t = logits((3, 40)).requires_grad_()
    fd.distill_loss(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None


def test_module_matches_functional():
    s, t = logits((2, 3, 40)), logits((2, 3, 40))
    labels = torch.randint(0, 40, (2, 3))
    opts = dict(divergence="skew_reverse_kl", beta=0.2, temperature=2.0, hard_weight=0.5)
    mod = fd.DistillLoss(**opts)
    assert torch.equal(mod(s, t, labels), fd.distill_loss(s, t, labels, **opts))
    assert torch.equal(mod(s, t, labels, num_items_in_batch=4),
                       fd.distill_loss(s, t, labels, num_items_in_batch=4, **opts))
    assert "skew_reverse_kl" in repr(mod)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_fullgraph(backend):
    if backend not in BACKENDS:
        pytest.fail(f"{backend} backend unavailable")
    s, t = logits((4, 64)), logits((4, 64))
    labels = torch.randint(0, 64, (4,))
    labels[0] = -100

    def step(s, t, labels):
        return fd.distill_loss(s, t, labels, divergence="jsd", hard_weight=0.5, temperature=2.0,
                               backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    l1 = step(s1, t, labels)
    l2 = compiled(s2, t, labels)
    l1.backward()
    l2.backward()
    assert_close(l2, l1, **LOSS_TOL, what="compiled loss")
    assert_close(s2.grad, s1.grad, **GRAD_TOL, what="compiled grad")


def test_torch_compile_inductor():
    s, t = logits((4, 64)), logits((4, 64))
    f = torch.compile(lambda s, t: fd.distill_loss(s, t, reduction="none").sum(), fullgraph=True)
    s1 = s.clone().requires_grad_()
    f(s1, t).backward()
    s2 = s.clone().requires_grad_()
    fd.distill_loss(s2, t, reduction="none").sum().backward()
    assert_close(s1.grad, s2.grad, **GRAD_TOL, what="inductor grad")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_distill(backend, per_row):
    s = logits((5, 33)).requires_grad_()
    t = logits((5, 33))
    labels = torch.randint(0, 33, (5,))
    scale = torch.tensor(0.2)
    k = fd.DistillConfig(divergence="jsd", beta=0.3, temperature=1.5, t2_scale=True,
                         hard_weight=0.5).kernel_options()
    args = (s, t, labels, scale, k.divergence, k.beta, k.s_mul, k.t_mul, k.h_mul, k.soft_scale,
            k.hard_weight, k.ignore_index, 33, per_row, backend, True)
    torch.library.opcheck(torch.ops.fastdistill.distill.default, args)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_feature(backend):
    s = logits((5, 16)).requires_grad_()
    t = logits((5, 16))
    args = (s, t, torch.rand(5) > 0.3, torch.tensor(0.5), 2, False, backend, True)
    torch.library.opcheck(torch.ops.fastdistill.feature.default, args)


def _linear_inputs(N=6, Ds=12, Dt=10, V=29):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(N, Ds, generator=g).requires_grad_()
    ws = (torch.randn(V, Ds, generator=g) * 0.5).requires_grad_()
    bs = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    ht, wt = torch.randn(N, Dt, generator=g), torch.randn(V, Dt, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = -100
    return hs, ws, bs, ht, wt, labels


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_linear_distill(backend, per_row):
    hs, ws, bs, ht, wt, labels = _linear_inputs()
    args = (hs, ws, bs, ht, wt, None, None, labels, torch.tensor(0.25), None, 2, 0.3, 1 / 1.5,
            1.0, 0.5, -100, 29, 1.2, 0.9, 7.0, None, per_row, "chunked", backend, 4, 0,
            True, True, True)
    torch.library.opcheck(torch.ops.fastdistill.linear_distill.default, args)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_torch_compile_fullgraph(backend, reduction):
    """linear_distill_loss traces into one graph (a custom op with a fake kernel)."""
    hs, ws, bs, ht, wt, labels = _linear_inputs()

    def step(h, w, b):
        loss = fd.linear_distill_loss(h, w, ht, wt, labels, student_bias=b, divergence="jsd",
                                      hard_weight=0.5, temperature=2.0, student_softcap=6.0,
                                      reduction=reduction, backend=backend, chunk_size=4)
        return (loss * 2.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    b = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    l1 = step(*a)
    l2 = compiled(*b)
    l1.backward()
    l2.backward()
    assert_close(l2, l1, **LOSS_TOL, what="compiled linear loss")
    for x, y in zip(a, b):
        assert_close(y.grad, x.grad, **GRAD_TOL, what="compiled linear grad")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_projected_feature(backend, per_row):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 8, generator=g).requires_grad_()
    w = (torch.randn(12, 8, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(12, generator=g) * 0.1).requires_grad_()
    t = torch.randn(6, 12, generator=g)
    mask = torch.tensor([True, True, False, True, True, True])
    args = (s, w, b, t, mask, torch.tensor(0.5), None, 2, per_row, backend, 4, True, True, True)
    torch.library.opcheck(torch.ops.fastdistill.projected_feature.default, args)
