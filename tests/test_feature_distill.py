"""FeatureDistillLoss (feature losses over several layer pairs), against float64 references
that compute every layer pair separately (reference_feature_loss); LayerMap and the schedules
themselves are in test_layer_map.py."""

import io

import pytest
import torch
from torch import nn

import fastdistill as fd
from fastdistill.feature import reference_feature_loss
from util import GRAD_TOL, LOSS_TOL, assert_close, cpu_backends, small

BACKENDS = cpu_backends()
KINDS = fd.FEATURE_KINDS

# uniform(3, 5) = [(0, 1), (1, 2), (2, 4)]; with student width 16 and these teacher widths,
# pairs 0 and 2 are compared directly and pair 1 goes through a 16 -> 24 projection
LS, LT = 3, 5
MIXED_T_DIMS = [24, 16, 24, 24, 16]


def hidden(n_layers, dims, lead, dtype=torch.float32, grad=False):
    """A Hugging Face style hidden_states tuple: the embedding output + one tensor per layer."""
    dims = [dims] * n_layers if isinstance(dims, int) else dims
    out = [torch.randn(*lead, dims[0], dtype=torch.float64).to(dtype)]
    out += [torch.randn(*lead, d, dtype=torch.float64).to(dtype) for d in dims]
    return tuple(x.requires_grad_(grad) for x in out)


def reference(crit, s_hs, t_hs, mask, active=None, grad_out=None):
    """The loss in float64, one reference_feature_loss per pair; returns (loss, grads of the
    student hidden states by layer, grads of the projections by pair position)."""
    pairs = crit.layer_map.pairs
    active = range(len(pairs)) if active is None else active
    w = [crit.weights[p] for p in active]
    total = sum(w) if crit.normalize_weights else 1.0
    s64 = {i: x.detach().double().requires_grad_() for i, x in enumerate(s_hs)}
    m = None if mask is None else mask.bool()
    projs, loss = {}, 0.0
    for p, wp in zip(active, w):
        s, t = pairs[p]
        proj = crit.projection(p)
        p64 = None
        if proj is not None:
            p64 = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None,
                            dtype=torch.float64)
            p64.load_state_dict({k: v.double() for k, v in proj.state_dict().items()})
            projs[p] = p64
        loss = loss + wp / total * reference_feature_loss(
            s64[s + 1], t_hs[t + 1].detach().double(), crit.kind, m, p64, crit.reduction)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.double())
    return loss.detach(), {i: x.grad for i, x in s64.items()}, projs


def check(crit, s_hs, t_hs, mask=None, step=None, active=None, grad_out=None, tol=None,
          grad_tol=None):
    loss = crit(s_hs, t_hs, mask, step=step)
    ref, ref_grads, ref_projs = reference(crit, s_hs, t_hs, mask, active, grad_out)
    loss.backward(torch.ones_like(loss) if grad_out is None else grad_out.float())
    assert loss.dtype == torch.float32
    assert_close(loss, ref, **(tol or LOSS_TOL), what="loss")
    for i, x in enumerate(s_hs):
        g = ref_grads[i] if ref_grads[i] is not None else torch.zeros_like(x, dtype=torch.float64)
        if x.grad is None:
            assert torch.all(g == 0), f"student hidden state {i} got no gradient"
        else:
            assert_close(x.grad, g, **(grad_tol or GRAD_TOL), what=f"student grad [{i}]")
    for p, p64 in ref_projs.items():
        proj = crit.projection(p)
        assert_close(proj.weight.grad, p64.weight.grad, **GRAD_TOL, what=f"proj {p} weight grad")
        if proj.bias is not None:
            assert_close(proj.bias.grad, p64.bias.grad, **GRAD_TOL, what=f"proj {p} bias grad")
    assert all(x.grad is None for x in t_hs), "teacher hidden states must get no gradient"
    return loss


def make(mode, kind, backend, reduction="mean", **kw):
    """mode: direct (equal widths, fused), mixed (direct + projected), all (every pair
    projected, random init so the projections matter)."""
    lm = fd.LayerMap.uniform(LS, LT)
    ds = 16
    if mode == "direct":
        return fd.FeatureDistillLoss(lm, ds, ds, kind, project=False, reduction=reduction,
                                     backend=backend, **kw), ds, ds
    if mode == "mixed":
        return fd.FeatureDistillLoss(lm, ds, MIXED_T_DIMS, kind, projection_init="xavier",
                                     reduction=reduction, backend=backend, **kw), ds, MIXED_T_DIMS
    return fd.FeatureDistillLoss(lm, ds, 24, kind, project="all", projection_init="xavier",
                                 reduction=reduction, backend=backend, **kw), ds, 24


def lead_for(backend):
    return (2, 3) if small(backend) else (2, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["direct", "mixed", "all"])
@pytest.mark.parametrize("masked", [False, True])
def test_pairs_against_reference(backend, kind, mode, masked):
    crit, ds, dt = make(mode, kind, backend, weights=[1.0, 2.0, 0.5])
    lead = lead_for(backend)
    s_hs, t_hs = hidden(LS, ds, lead, grad=True), hidden(LT, dt, lead, grad=True)
    mask = None
    if masked:
        mask = (torch.rand(lead) > 0.3).long()  # Hugging Face attention masks are int64
        mask[0, 0] = 0
    check(crit, s_hs, t_hs, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reductions(backend, reduction, normalize):
    crit, ds, dt = make("mixed", "normalized_mse", backend, reduction,
                        normalize_weights=normalize)
    lead = lead_for(backend)
    s_hs, t_hs = hidden(LS, ds, lead, grad=True), hidden(LT, dt, lead)
    mask = torch.rand(lead) > 0.4
    go = torch.rand(lead) + 0.5 if reduction == "none" else None
    loss = check(crit, s_hs, t_hs, mask, grad_out=go)
    assert loss.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_hidden_states(backend, kind):
    """bf16 hidden states with float32 projections (the usual mixed-precision setup)."""
    crit, ds, dt = make("mixed", kind, backend)
    lead = (3, 5)
    s_hs = hidden(LS, ds, lead, torch.bfloat16, grad=True)
    t_hs = hidden(LT, dt, lead, torch.bfloat16)
    check(crit, s_hs, t_hs, torch.rand(lead) > 0.2, grad_tol=dict(rtol=2 ** -8, atol=1e-6))
    assert s_hs[1].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 1.0, 0.5, 1.0]])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_many_pairs_one_launch_equals_single_calls(backend, weights, reduction, monkeypatch):
    """Five equal-width pairs go through ONE kernel call (one per distinct weight for mean /
    sum, where the weight is folded into the gradient scale) and give the sum of five
    feature_loss calls (same backend)."""
    lm = fd.LayerMap.explicit([(0, 0), (1, 2), (2, 3), (3, 5), (3, 4)], 4, 6)
    D = 8 if small(backend) else 32
    lead = lead_for(backend)
    mask = torch.rand(lead) > 0.3
    s_hs, t_hs = hidden(4, D, lead), hidden(6, D, lead)
    go = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(1.0)

    calls = []
    impl = fd.backends.get(backend)
    real = impl.feature_forward

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(impl, "feature_forward", counting)
    crit = fd.FeatureDistillLoss(lm, D, D, "cosine", weights, project=False,
                                 reduction=reduction, backend=backend, fuse=True)
    s_a = [x.clone().requires_grad_() for x in s_hs]
    fused = crit(s_a, t_hs, mask)
    fused.backward(go)
    N = mask.numel()
    if weights is None or reduction == "none":
        assert calls == [(5 * N, D)], "the five pairs must take one kernel call"
    else:  # weight 1 (pairs 0, 2, 4), 3 and 0.5
        assert calls == [(3 * N, D), (N, D), (N, D)]

    calls.clear()
    s_b = [x.clone().requires_grad_() for x in s_hs]
    w = weights or [1.0] * 5
    single = sum(wp / sum(w) * fd.feature_loss(s_b[s + 1], t_hs[t + 1], kind="cosine", mask=mask,
                                               reduction=reduction, backend=backend)
                 for wp, (s, t) in zip(w, lm.pairs))
    single.backward(go)
    assert len(calls) == 5
    assert_close(fused, single, rtol=1e-6, atol=1e-7, what="fused vs single calls")
    for a, b in zip(s_a[1:], s_b[1:]):
        # the pair weight enters before (fused) or after (single) the cosine gradient's
        # cancellation of its two terms (each ~1e-2): a few float32 roundings of those
        assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8, what="fused grad")

    calls.clear()
    unfused = fd.FeatureDistillLoss(lm, D, D, "cosine", weights, project=False,
                                    reduction=reduction, backend=backend, fuse=False)
    assert_close(unfused(s_hs, t_hs, mask), single, rtol=1e-6, atol=1e-7, what="unfused")
    assert len(calls) == 5


def test_fuse_auto_follows_the_size_limit(monkeypatch):
    from fastdistill import feature_distill
    lm = fd.LayerMap.uniform(3, 3)
    s_hs, t_hs = hidden(3, 16, (4, 8)), hidden(3, 16, (4, 8))  # 2 KiB per pair
    calls = []
    impl = fd.backends.get("torch")
    real = impl.feature_forward
    monkeypatch.setattr(impl, "feature_forward", lambda *a: calls.append(1) or real(*a))
    crit = fd.FeatureDistillLoss(lm, 16, 16, project=False, backend="torch")
    ref = crit(s_hs, t_hs)
    assert len(calls) == 1
    monkeypatch.setitem(feature_distill.FUSE_MAX_BYTES, "cpu", 2047)
    calls.clear()
    assert_close(crit(s_hs, t_hs), ref, rtol=1e-6, atol=0, what="auto, not fused")
    assert len(calls) == 3
    with pytest.raises(ValueError, match="fuse must be True, False or 'auto'"):
        fd.FeatureDistillLoss(lm, 16, 16, fuse="always")


# ---- FeatureDistillLoss with a schedule, projections, state --------------------------------------

def test_schedule_selects_pairs_and_renormalises():
    lm = fd.LayerMap.uniform(4, 8)
    sched = fd.ProgressiveLayerDrop(lm, keep=2, total_steps=20)
    crit = fd.FeatureDistillLoss(lm, 12, [12, 20, 12, 20, 12, 12, 12, 12], "mse",
                                 weights=[1.0, 2.0, 3.0, 4.0], schedule=sched)
    lead = (2, 5)
    t_hs = hidden(8, [12, 20, 12, 20, 12, 12, 12, 12], lead)
    for step, active in [(0, (0, 1, 2, 3)), (10, (1, 2, 3)), (20, (2, 3))]:
        s_hs = hidden(4, 12, lead, grad=True)
        crit.zero_grad(set_to_none=True)
        check(crit, s_hs, t_hs, step=step, active=active)
        assert sched.current_step == 0
        # pair 0 is (0, 1): 12 -> 20, projected; it has no gradient once dropped
        assert (crit.projection(0).weight.grad is None) == (0 not in active)
    crit.step(10)
    s_hs = hidden(4, 12, lead, grad=True)
    check(crit, s_hs, t_hs, active=(1, 2, 3))  # step=None: the schedule's counter


def test_state_dict_round_trip():
    lm = fd.LayerMap.last(3, 4, 6)
    make_ = lambda seed: fd.FeatureDistillLoss(  # noqa: E731
        lm, 8, 16, "cosine", projection_init="orthogonal",
        schedule=fd.StochasticLayerDrop(lm, 0.5, total_steps=40, seed=seed))
    a = make_(3)
    a.step(25)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_(4)
    b.load_state_dict(torch.load(buf, weights_only=True))  # plain Python types only
    assert b.schedule.current_step == 25 and b.schedule.seed == 3
    for k, v in a.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, b.state_dict()[k]), k
    s_hs, t_hs = hidden(4, 8, (2, 3)), hidden(6, 16, (2, 3))
    assert torch.equal(a(s_hs, t_hs), b(s_hs, t_hs))
    assert sorted(a.state_dict()) == ["_extra_state"] + [
        f"projections.s{s}_t{t}.{n}" for s, t in lm.pairs for n in ("bias", "weight")]
    plain = fd.FeatureDistillLoss(lm, 8, 16)
    with pytest.raises(ValueError, match="one has a schedule and the other does not"):
        plain.load_state_dict(a.state_dict())


def test_projection_inits():
    lm = fd.LayerMap.explicit([(0, 0), (1, 1), (2, 2)], 3, 3)
    crit = fd.FeatureDistillLoss(lm, [6, 10, 8], [10, 6, 8], project="all")
    w = [crit.projection(p).weight.detach() for p in range(3)]
    assert torch.equal(w[0], torch.eye(10, 6)) and torch.equal(w[1], torch.eye(6, 10))
    assert torch.equal(w[2], torch.eye(8))
    assert all(torch.all(crit.projection(p).bias == 0) for p in range(3))
    orth = fd.FeatureDistillLoss(lm, [6, 10, 8], [10, 6, 8], project="all",
                                 projection_init="orthogonal", projection_bias=False)
    w0, w1 = orth.projection(0).weight.detach(), orth.projection(1).weight.detach()
    assert orth.projection(0).bias is None
    assert_close(w0.t() @ w0, torch.eye(6), rtol=0, atol=1e-5, what="W^T W")  # 10 x 6
    assert_close(w1 @ w1.t(), torch.eye(6), rtol=0, atol=1e-5, what="W W^T")  # 6 x 10
    xav = fd.FeatureDistillLoss(lm, [6, 10, 8], [10, 6, 8], project="all",
                                projection_init="xavier")
    assert xav.projection(0).weight.abs().max() <= (6 / 16) ** 0.5
    # identity projections on equal widths start from the direct comparison exactly
    same = fd.LayerMap.uniform(2, 4)
    s_hs, t_hs = hidden(2, 8, (3, 4)), hidden(4, 8, (3, 4))
    direct = fd.FeatureDistillLoss(same, 8, 8, "normalized_mse", project=False)(s_hs, t_hs)
    ident = fd.FeatureDistillLoss(same, 8, 8, "normalized_mse", project="all")(s_hs, t_hs)
    assert_close(ident, direct, rtol=1e-6, atol=1e-7, what="identity projection")
    # optimizers see the projections: project="all" owns two 8x8 Linear layers, the default
    # (projection only where widths differ) none here
    params = list(fd.FeatureDistillLoss(same, 8, 8, project="all").parameters())
    assert sum(p.numel() for p in params) == 2 * (64 + 8)
    assert list(fd.FeatureDistillLoss(same, 8, 8).parameters()) == []


def test_bad_input():
    lm = fd.LayerMap.uniform(2, 4)
    s_hs, t_hs = hidden(2, 8, (2, 3)), hidden(4, 12, (2, 3))
    crit = fd.FeatureDistillLoss(lm, 8, 12)
    with pytest.raises(ValueError, match=r"project=False needs equal widths"):
        fd.FeatureDistillLoss(lm, 8, 12, project=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        fd.FeatureDistillLoss(lm, 8, 12, kind="l1")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fd.FeatureDistillLoss(lm, 8, 12, reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        fd.FeatureDistillLoss(lm, 8, 12, backend="gpu")
    with pytest.raises(ValueError, match="project must be True, False or 'all'"):
        fd.FeatureDistillLoss(lm, 8, 12, project="yes")
    with pytest.raises(ValueError, match="projection_init must be one of"):
        fd.FeatureDistillLoss(lm, 8, 12, projection_init="eye")
    with pytest.raises(TypeError, match="layer_map must be a fastdistill.LayerMap"):
        fd.FeatureDistillLoss([(0, 1), (1, 3)], 8, 12)
    with pytest.raises(ValueError, match=r"teacher_dims must be an int or one width per layer "
                                         r"\(4 layers\), got 2"):
        fd.FeatureDistillLoss(lm, 8, [12, 12])
    with pytest.raises(ValueError, match=r"weights must have one entry per pair \(2\), got 3"):
        fd.FeatureDistillLoss(lm, 8, 12, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="weights must be positive and finite"):
        fd.FeatureDistillLoss(lm, 8, 12, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="schedule has 3 pairs but layer_map has 2"):
        fd.FeatureDistillLoss(lm, 8, 12, schedule=fd.ProgressiveLayerDrop(3, 1, 10))
    with pytest.raises(ValueError, match=r"student_hidden_states must have 3 entries \(the "
                                         r"embedding output and 2 layers"):
        crit(s_hs[1:], t_hs)
    with pytest.raises(TypeError, match="teacher_hidden_states must be a tuple or list"):
        crit(s_hs, torch.stack(t_hs))
    with pytest.raises(ValueError, match=r"teacher_hidden_states\[4\] \(layer 3\) has width 10 "
                                         r"but the loss was built for 12"):
        crit(s_hs, t_hs[:4] + (torch.randn(2, 3, 10),))
    with pytest.raises(ValueError, match=r"teacher_hidden_states\[2\] has leading shape \(2, 4\)"):
        crit(s_hs, (t_hs[0], t_hs[1], torch.randn(2, 4, 12)) + t_hs[3:])
    with pytest.raises(ValueError, match=r"attention_mask must have the hidden states' leading "
                                         r"shape \(2, 3\), got \(2, 4\)"):
        crit(s_hs, t_hs, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer tensor"):
        crit(s_hs, t_hs, torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"student_hidden_states\[1\] must be float32"):
        crit((s_hs[0], s_hs[1].long(), s_hs[2]), t_hs)
    # a projection of the wrong shape (e.g. swapped) is rejected by name
    with pytest.raises(ValueError, match=r"projection must have shape \[Dt, Ds\] = \[12, 8\]"):
        fd.feature_loss(s_hs[1], t_hs[2], projection=nn.Linear(12, 8))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("widths", ["direct", "projected"])
def test_torch_compile_fullgraph(reduction, widths):
    """Direct pairs (one fused custom-op call per weight) and projected pairs (the custom op
    fastdistill::projected_feature) trace into one graph, without graph breaks."""
    lm = fd.LayerMap.uniform(2, 4)
    dt = 16 if widths == "direct" else 24
    crit = fd.FeatureDistillLoss(lm, 16, dt, "normalized_mse", weights=[1.0, 2.0],
                                 reduction=reduction)
    s_hs, t_hs = hidden(2, 16, (2, 3)), hidden(4, dt, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    grads = []
    for fn in (crit, torch.compile(crit, fullgraph=True, backend="aot_eager")):
        s = [x.clone().requires_grad_() for x in s_hs]
        crit.zero_grad(set_to_none=True)
        loss = fn(s, t_hs, mask)
        loss.sum().backward()
        grads.append((loss.detach(), [x.grad for x in s[1:]] +
                      [p.grad.clone() for p in crit.parameters()]))
    assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7, what="compiled loss")
    assert len(grads[0][1]) == (2 if widths == "direct" else 6)
    for a, b in zip(grads[1][1], grads[0][1]):
        assert_close(a, b, rtol=1e-6, atol=1e-9, what="compiled grad")
