"""Sparse (top-k) teachers: distill_loss(student, None, labels, teacher_topk=(indices, logprobs))
on every backend of both devices against the float64 reference (reference_topk_distill_loss):
the three tails and every divergence, the options, K = V against the dense loss, the stable tail
mass, the special values, and rejected indices (an error on CPU tensors, a NaN row below the
API on every backend)."""

import math

import pytest
import torch

import fastdistill as fd
from fastdistill import backends
from fastdistill.config import TOPK_TAILS, DistillConfig
from fastdistill.reference import reference_distill_loss, reference_topk_distill_loss
from util import BF16, DTYPES, F16, F32, assert_close, cases, small, tolerances

TAILS = TOPK_TAILS
DIVS = fd.DIVERGENCES


def shape(backend, device):
    """(N, V, K): odd sizes; several tiles / units for the interpreted and emulated kernels."""
    if device == "cuda":
        return 9, 3001, 64
    return (4, 150, 7) if small(backend, device) else (6, 333, 19)


def teacher(N, V, K, T=1.0, device="cpu", lp_dtype=torch.float32, idx_dtype=torch.int64,
            scale=3.0):
    """Top-K of a random teacher at temperature T: (indices, logprobs), distinct indices in a
    random order (not sorted: the kernels must not rely on it)."""
    t = torch.randn(N, V, dtype=torch.float64) * scale
    lp = torch.log_softmax(t / T, -1)
    idx = lp.topk(K, -1).indices
    perm = torch.argsort(torch.rand(N, K), -1)
    idx = idx.gather(1, perm)
    return (idx.to(device=device, dtype=idx_dtype),
            lp.gather(1, idx).to(device=device, dtype=lp_dtype))


def student(shape_, dtype, device, scale=3.0):
    return (torch.randn(shape_, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def run_both(s, topk, labels=None, grad_out=None, backend="auto", **kw):
    """(loss, grad, ref_loss, ref_grad) of fastdistill and the float64 reference."""
    x = s.detach().clone().requires_grad_(True)
    loss = fd.distill_loss(x, None, labels, teacher_topk=topk, backend=backend, **kw)
    x64 = s.detach().cpu().to(torch.float64).requires_grad_(True)
    lab = labels.cpu() if labels is not None else None
    mask = kw.pop("mask", None)
    ref = reference_topk_distill_loss(x64, topk[0].cpu(), topk[1].cpu(), lab,
                                      mask=mask.cpu() if mask is not None else None, **kw)
    g = torch.ones_like(ref) if grad_out is None else grad_out.cpu().to(torch.float64)
    loss.backward(g.to(loss.device, torch.float32))
    ref.backward(g)
    return loss.detach(), x.grad, ref.detach(), x64.grad


def check(backend, s, topk, labels=None, grad_out=None, loss_tol=None, grad_tol=None, **kw):
    lt, gt = tolerances(s.dtype)
    if topk[1].dtype != torch.float32:  # the reference sees the same rounded logprobs
        lt = dict(rtol=5e-5, atol=5e-5)
    loss, grad, ref, ref_grad = run_both(s, topk, labels, grad_out, backend=backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_close(loss, ref, **(loss_tol or lt), what=f"{backend} loss {kw}")
    assert_close(grad, ref_grad, **(grad_tol or gt), what=f"{backend} grad {kw}")
    return loss, grad


def kw_beta(div):
    return dict(divergence=div, beta=0.3, ratio=0.6)


# ---- values and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases(DTYPES))
@pytest.mark.parametrize("tail", TAILS)
def test_tails_and_divergences(device, backend, dtype, tail):
    N, V, K = shape(backend, device)
    for div in DIVS:
        s = student((N, V), dtype, device)
        check(backend, s, teacher(N, V, K, device=device), topk_tail=tail, **kw_beta(div))


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_temperature_hard_loss_ignore(device, backend, dtype, tail, divergence):
    """T != 1 (the CE then has its own log-sum-exp), hard-label mixing with a label inside and
    one outside the indices, ignored rows, per-row losses with a per-row grad_output."""
    N, V, K = shape(backend, device)
    T = 1.7
    idx, lp = teacher(N, V, K, T=T, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = -100
    labels[0] = idx[0, 3]
    labels[2] = V - 1
    loss, grad = check(backend, student((N, V), dtype, device), (idx, lp), labels,
                       torch.rand(N, device=device) + 0.5, topk_tail=tail, temperature=T,
                       t2_scale=True, hard_weight=0.4, soft_weight=0.6, reduction="none",
                       **dict(kw_beta(divergence), beta=0.6))
    assert loss[1] == 0 and torch.all(grad[1] == 0), "ignored rows: zero loss and gradient"


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_same_lse_hard_loss_and_options(device, backend, dtype):
    """T = 1 with a hard loss (CE shares the student's log-sum-exp), student_logit_scale, mask,
    num_items_in_batch, batchmean, int32 indices and 16-bit logprobs."""
    N, V, K = shape(backend, device)
    labels = torch.randint(0, V, (N,), device=device)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[-1] = False
    for tail in TAILS:
        idx, lp = teacher(N, V, K, device=device, idx_dtype=torch.int32, lp_dtype=BF16)
        check(backend, student((N, V), dtype, device), (idx, lp), labels, topk_tail=tail,
              hard_weight=0.5, student_logit_scale=0.8, mask=mask, num_items_in_batch=7)
        check(backend, student((N, V), dtype, device), teacher(N, V, K, device=device,
                                                               lp_dtype=F16),
              labels, topk_tail=tail, reduction="batchmean", divergence="skew_reverse_kl")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_shift_labels_and_leading_dims(device, backend, dtype):
    N, V, K = shape(backend, device)
    B, L = 2, max(2, N // 2)
    idx, lp = teacher(B * L, V, K, device=device)
    idx, lp = idx.reshape(B, L, K), lp.reshape(B, L, K)
    labels = torch.randint(0, V, (B, L), device=device)
    labels[0, 1] = -100
    for tail in TAILS:
        check(backend, student((B, L, V), dtype, device), (idx, lp), labels, topk_tail=tail,
              shift_labels=True, hard_weight=0.2)
        check(backend, student((B, L, V), dtype, device), (idx, lp), labels, topk_tail=tail,
              reduction="none")


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_vocab_size_padding(device, backend, dtype):
    """A padded student (vocab_size < width): padding columns get zero gradient and no mass."""
    N, V, K = shape(backend, device)
    s = student((N, V + 13), dtype, device)
    for tail in TAILS:
        loss, grad = check(backend, s, teacher(N, V, K, device=device), topk_tail=tail,
                           vocab_size=V)
        assert torch.all(grad[:, V:] == 0)


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("divergence", DIVS)
def test_k_equals_v_is_the_dense_loss(device, backend, dtype, divergence):
    """With every column among the indices there is no tail bin: "bucket" (and "none") equal
    the dense loss against the teacher's logits, on the same backend."""
    N, V, _ = shape(backend, device)
    V = min(V, 96)
    t = student((N, V), F32, device)
    lp = torch.log_softmax(t.double() / 1.3, -1)
    idx = torch.argsort(torch.rand(N, V, device=device), -1)
    topk = (idx, lp.gather(1, idx).float())
    s = student((N, V), dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    kw = dict(temperature=1.3, hard_weight=0.3, **kw_beta(divergence))
    ref = reference_distill_loss(s.double().cpu(), t.double().cpu(), labels.cpu(), **kw)
    x = s.clone().requires_grad_()
    dense = fd.distill_loss(x, t, labels, backend=backend, **kw)
    dense.backward()
    for tail in ("bucket", "none"):
        y = s.clone().requires_grad_()
        sparse = fd.distill_loss(y, None, labels, teacher_topk=topk, topk_tail=tail,
                                 backend=backend, **kw)
        sparse.backward()
        assert_close(sparse, ref, rtol=1e-4, atol=2e-5, what=f"K = V {tail} vs float64 dense")
        lt, gt = tolerances(dtype)
        assert_close(sparse, dense, rtol=1e-4, atol=2e-5, what=f"K = V {tail} vs dense")
        assert_close(y.grad, x.grad, **gt, what=f"K = V {tail} grad vs dense")


def test_k_equals_v_reference():
    """The float64 references agree: bucket / none at K = V are the dense divergence, and so is
    renormalize (both sides already sum to 1)."""
    a = torch.randn(5, 40, dtype=torch.float64) * 3
    b = torch.randn(5, 40, dtype=torch.float64) * 3
    idx = torch.argsort(torch.rand(5, 40), -1)
    lp = torch.log_softmax(b, -1).gather(1, idx)
    for div in DIVS:
        dense = reference_distill_loss(a, b, reduction="none", **kw_beta(div))
        for tail in TAILS:
            sparse = reference_topk_distill_loss(a, idx, lp, topk_tail=tail, reduction="none",
                                                 **kw_beta(div))
            torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend,dtype", cases(only=("torch", "cpu", "triton", "cuda",
                                                              "cuda_emu")))
def test_tail_mass_is_stable(device, backend, dtype):
    """The indices hold all but ~1e-9 of the student's mass: the tail is exp(LSE_out - LSE),
    not 1 - sum q (which would be 0 or noise in float32); the bucket loss keeps its tail term
    P_out log(P_out / Q_out) to the reference's accuracy."""
    N, V, K = shape(backend, device)
    idx, lp = teacher(N, V, K, device=device)
    # a teacher that leaves 1e-3 outside its indices
    lp = (lp.double() - torch.logsumexp(lp.double(), -1, keepdim=True) + math.log1p(-1e-3))
    s = torch.zeros(N, V, dtype=torch.float64, device=device)
    s.scatter_(1, idx, 25.0 + torch.randn(N, K, dtype=torch.float64, device=device))
    s = s.to(dtype)
    loss, grad, ref, ref_grad = run_both(s, (idx, lp.float()), backend=backend,
                                         topk_tail="bucket", reduction="none")
    tail_term = 1e-3 * math.log(1e-3 / (V * math.exp(-25.0)))  # about 0.01
    assert tail_term > 5e-3
    assert_close(loss, ref, rtol=2e-5, atol=1e-6, what="loss with a 1e-9 student tail")
    assert_close(grad, ref_grad, **tolerances(dtype)[1], what="grad with a 1e-9 student tail")


# ---- special values -----------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend,dtype", cases())
def test_special_values(device, backend, dtype):
    N, V, K = shape(backend, device)
    N = max(N, 5)
    idx, lp = teacher(N, V, K, device=device)
    s = student((N, V), dtype, device)
    s[0, idx[0, 2]] = -math.inf          # q = 0 at an index where P > 0
    lp[1, 1] = -math.inf                 # a teacher probability of 0 at an index
    lp[2] = lp[2] - torch.logsumexp(lp[2], 0) + 1e-6  # P sums above 1: no tail mass
    for tail in TAILS:
        for div in ("forward_kl", "jsd", "tvd", "skew_forward_kl"):
            loss, grad, ref, ref_grad = run_both(s, (idx, lp), backend=backend, topk_tail=tail,
                                                 reduction="none", **kw_beta(div))
            assert_close(loss, ref, rtol=1e-4, atol=1e-5, what=f"{tail} {div} special loss")
            fin = torch.isfinite(ref_grad)
            assert torch.isfinite(grad[1:]).all(), f"{tail} {div}: finite gradients"
            assert_close(grad.double().cpu()[fin], ref_grad[fin], **tolerances(dtype)[1],
                         what=f"{tail} {div} special grad")
        if tail != "renormalize":
            fk = fd.distill_loss(s, None, teacher_topk=(idx, lp), topk_tail=tail,
                                 reduction="none", backend=backend)
            assert fk[0] == math.inf, "forward KL is +inf where P has mass and Q none"
    # the support is the finite log-probabilities, whether or not they underflow (as the
    # dense rules): a teacher logprob of -200 where the student is -inf makes forward KL +inf
    lp2, s2 = lp.clone(), s.clone()
    lp2[3, 4] = -200.0
    s2[3, idx[3, 4]] = -math.inf
    for tail in ("bucket", "none"):
        fk = fd.distill_loss(s2, None, teacher_topk=(idx, lp2), topk_tail=tail,
                             reduction="none", backend=backend)
        assert fk[3] == math.inf and torch.isfinite(fk[4:]).all(), tail
    # reverse KL with a teacher zero where the student has mass: +inf, NaN gradient
    x = s.clone().requires_grad_()
    rk = fd.distill_loss(x, None, teacher_topk=(idx, lp), topk_tail="none", reduction="none",
                         divergence="reverse_kl", backend=backend)
    rk.sum().backward()
    assert rk[1] == math.inf and torch.isnan(x.grad[1]).all()
    assert torch.isfinite(x.grad[3]).all()


@pytest.mark.parametrize("device,backend,dtype", cases())
def test_nan_rules(device, backend, dtype):
    """A NaN logprob, or a NaN student logit where the loss reads it: NaN loss and gradient for
    that row only. renormalize reads the student only at the indices."""
    N, V, K = shape(backend, device)
    idx, lp = teacher(N, V, K, device=device)
    lp[0, 0] = math.nan
    s = student((N, V), dtype, device)
    outside = next(j for j in range(V) if j not in idx[1].tolist())
    s[1, outside] = math.nan
    for tail in TAILS:
        x = s.clone().requires_grad_()
        loss = fd.distill_loss(x, None, teacher_topk=(idx, lp), topk_tail=tail,
                               reduction="none", backend=backend)
        loss.sum().backward()
        assert torch.isnan(loss[0]) and torch.isnan(x.grad[0]).all()
        if tail == "renormalize":  # a loss of the K logits only: zero gradient elsewhere
            assert torch.isfinite(loss[1]) and torch.isfinite(x.grad[1]).all()
            assert x.grad[1, outside] == 0
        else:
            assert torch.isnan(loss[1]) and torch.isnan(x.grad[1]).all()
        assert torch.isfinite(loss[2:]).all() and torch.isfinite(x.grad[2:]).all()


# ---- rejected indices ----------------------------------------------------------------------------

def test_bad_indices_raise_on_cpu():
    N, V, K = 4, 50, 6
    idx, lp = teacher(N, V, K)
    s = student((N, V), F32, "cpu")
    for bad, msg in ((V, "in \\[0, 50\\)"), (-1, "in \\[0, 50\\)")):
        i2 = idx.clone()
        i2[2, 3] = bad
        with pytest.raises(ValueError, match=f"teacher_topk indices must be {msg}.*row 2"):
            fd.distill_loss(s, None, teacher_topk=(i2, lp))
    i2 = idx.clone()
    i2[1, 4] = i2[1, 0]
    with pytest.raises(ValueError, match="distinct within a row.*row 1"):
        fd.distill_loss(s, None, teacher_topk=(i2.int(), lp))
    # rows that do not count may hold anything (padding)
    labels = torch.zeros(N, dtype=torch.int64)
    labels[1] = -100
    loss = fd.distill_loss(s, None, labels, teacher_topk=(i2, lp))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device,backend,dtype", cases(dtypes=(F32, BF16)))
def test_bad_indices_below_the_api(device, backend, dtype):
    """The kernels' no-sync rule, on every backend: a row with an index outside [0, vocab) or a
    repeated index gets a NaN loss and a zero gradient; the other rows are untouched."""
    N, V, K = shape(backend, device)
    N = max(N, 4)
    idx, lp = teacher(N, V, K, device=device)
    idx[0, 1] = V              # out of range (the student is wider: vocab = V)
    idx[1, 5] = idx[1, 2]      # repeated
    idx[2, 0] = -3
    s = student((N, V + 5), dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    opts = DistillConfig(hard_weight=0.3).kernel_options()
    gs = torch.tensor(1.0, device=device)
    for tail in range(3):
        for it in (torch.int32, torch.int64):
            rows, grad = backends.get(backend).topk_forward(
                s.clone(), idx.to(it), lp, labels, opts, tail, V, gs, True)
            assert torch.isnan(rows[:3]).all(), (tail, it)
            assert (grad[:3] == 0).all()
            assert torch.isfinite(rows[3:]).all() and torch.isfinite(grad[3:]).all()
            ok, _ = backends.get("torch").topk_forward(s.clone(), idx, lp, labels, opts, tail, V,
                                                       gs, False)
            assert_close(rows[3:], ok[3:], rtol=1e-5, atol=1e-5, what="good rows")


# ---- API -----------------------------------------------------------------------------------------

def test_argument_errors():
    N, V, K = 3, 20, 4
    idx, lp = teacher(N, V, K)
    s = student((N, V), F32, "cpu")
    t = student((N, V), F32, "cpu")
    with pytest.raises(ValueError, match="either teacher_logits or teacher_topk"):
        fd.distill_loss(s, t, teacher_topk=(idx, lp))
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor.*teacher_topk"):
        fd.distill_loss(s, None)
    with pytest.raises(TypeError, match="pair"):
        fd.distill_loss(s, None, teacher_topk=idx)
    with pytest.raises(TypeError, match="int32 or int64"):
        fd.distill_loss(s, None, teacher_topk=(idx.float(), lp))
    with pytest.raises(TypeError, match="logprobs must be float32"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp.double()))
    with pytest.raises(ValueError, match="logprobs must have the shape"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp[:, :2]))
    with pytest.raises(ValueError, match="leading shape"):
        fd.distill_loss(s, None, teacher_topk=(idx[:2], lp[:2]))
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp), teacher_logit_scale=2.0)
    with pytest.raises(ValueError, match="topk_tail must be one of"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp), topk_tail="drop")
    with pytest.raises(ValueError, match="teacher_topk logprobs requires grad"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp.clone().requires_grad_()))
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 20\]"):
        fd.distill_loss(s, None, teacher_topk=(idx, lp), vocab_size=21)


def test_module_and_config():
    N, V, K = 4, 30, 5
    idx, lp = teacher(N, V, K)
    s = student((N, V), F32, "cpu").requires_grad_()
    labels = torch.randint(0, V, (N,))
    crit = fd.DistillLoss(topk_tail="renormalize", divergence="jsd", hard_weight=0.5)
    a = crit(s, None, labels, teacher_topk=(idx, lp))
    b = fd.distill_loss(s, None, labels, teacher_topk=(idx, lp), topk_tail="renormalize",
                        divergence="jsd", hard_weight=0.5)
    assert torch.equal(a, b)
    assert "topk_tail='renormalize'" in repr(crit)
    cfg = fd.DistillConfig(topk_tail="none")
    c = fd.DistillLoss(config=cfg)(s, None, teacher_topk=(idx, lp))
    d = fd.distill_loss(s, None, teacher_topk=(idx, lp), topk_tail="none")
    assert torch.equal(c, d)


def test_compiles_in_one_graph():
    N, V, K = 4, 30, 5
    idx, lp = teacher(N, V, K)
    s = student((N, V), F32, "cpu").requires_grad_()

    def f(x, i, p):
        return fd.distill_loss(x, None, teacher_topk=(i, p), topk_tail="bucket", backend="cpu"
                               if backends.check("cpu", torch.device("cpu"))[0] else "torch")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(s, idx, lp)
    out.backward()
    ref = f(s.detach().clone().requires_grad_(), idx, lp)
    torch.testing.assert_close(out, ref)


def test_bench_topk_preset_builds():
    """The bench's top-k op (python -m fastdistill.bench --preset cpu-topk) at a tiny size:
    every provider runs forward + backward, and the stored teacher's bytes per token are the
    store's layout (6 K + 4) against the dense bf16 logits (2 V)."""
    from fastdistill.bench import __main__ as bench_cli
    from fastdistill.bench import cases as bench_cases
    assert bench_cli.PRESETS["cpu-topk"]["op"] == "topk"
    for p in bench_cases.topk_providers("cpu"):
        spec = dict(op="topk", provider=p, N=16, V=300, dtype="fp32", device="cpu",
                    temperature=1.0, hard_weight=0.0)
        run, reset, grad_bytes, moved, flops = bench_cases.build(spec)
        run()
        reset()
        k = {"fastdistill-dense": None}.get(p, int(p.split("topk")[1]) if "topk" in p else None)
        want = 600 if k is None else 6 * k + 4
        assert bench_cases.disk_bytes_per_token(spec) == want
