"""linear_distill_loss against the float64 reference that materialises the logits, over
(device, backend, dtype, mode): chunked on every backend, fused on triton; on CPU the Triton
kernels run through the interpreter (small shapes), on a GPU at their real tiles.

GPU sizes exercise the tile paths: N = 160 rows (a partial row block), V = 1013 (odd: a partial
column tile), Ds = 272 and Dt = 333 (not multiples of the 64-wide K step: masked K tails). The
16-bit CUDA path of the chunked mode (a ring of staged 16-bit gradient rows, grad_weight in
float32 as two 16-bit planes) also runs on CPU tensors here, with the tests' RING_DEVICES
patch and budgets small enough to force several rings. The GEMM with the accumulating epilogue
(kernels/linear.py: mm_into) is checked bit for bit against float32 accumulation."""

import math

import pytest
import torch

import fastdistill as fd
from fastdistill import _chunked
from fastdistill.divergences import reference_distill_loss
from util import BF16, F16, F32, assert_close, cases, cpu_backends

BACKENDS = cpu_backends()

CPU_SHAPE = dict(N=11, Ds=24, Dt=40, V=53)
GPU_SHAPE = dict(N=160, Ds=272, Dt=333, V=1013)


def linear_cases(dtypes=(F32,), cpu=True, gpu=True, modes=("chunked", "fused"), only=None):
    """pytest params (device, backend, dtype, mode): util.cases x the modes each backend has
    (fused: triton only)."""
    out = []
    for p in cases(dtypes, cpu=cpu, gpu=gpu, only=only):
        device, backend, dtype = p.values
        for mode in modes:
            if mode == "fused" and backend != "triton":
                continue
            out.append(pytest.param(device, backend, dtype, mode, id=f"{p.id}-{mode}",
                                    marks=p.marks))
    return out


def make(device="cpu", dtype=F32, N=None, Ds=None, Dt=None, V=None, Vs=None, Vt=None,
         lead=None, bias=True, teacher_bias=False, seed=7):
    base = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    N, Ds, Dt, V = N or base["N"], Ds or base["Ds"], Dt or base["Dt"], V or base["V"]
    g = torch.Generator().manual_seed(seed)
    Vs, Vt = Vs or V, Vt or V
    shape = lead or (N,)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    hs, ws = r(*shape, Ds), r(Vs, Ds, scale=3 / Ds ** 0.5)
    bs = r(Vs) if bias else None
    ht, wt = r(*shape, Dt), r(Vt, Dt, scale=3 / Dt ** 0.5)
    bt = r(Vt) if teacher_bias else None
    labels = torch.randint(0, V, shape, generator=g).to(device)
    return hs, ws, bs, ht, wt, bt, labels


def reference(hs, ws, bs, ht, wt, bt, labels, teacher_logits=None, student_softcap=None,
              teacher_softcap=None, **kw):
    """The loss on float64 logits, on CPU."""
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    hs, ws, bs, ht, wt, bt, labels = map(cpu, (hs, ws, bs, ht, wt, bt, labels))
    zs = hs.double() @ ws.double().t()
    if bs is not None:
        zs = zs + bs.double()
    if student_softcap:
        zs = student_softcap * torch.tanh(zs / student_softcap)
    if teacher_logits is None:
        zt = ht.double() @ wt.double().t()
        if bt is not None:
            zt = zt + bt.double()
    else:
        zt = teacher_logits.cpu().double()
    if teacher_softcap:
        zt = teacher_softcap * torch.tanh(zt / teacher_softcap)
    return reference_distill_loss(zs, zt, labels, **kw)


def tolerances(device, dtype, grad_scale):
    """(loss, gradient) tolerances. Losses: float32 logits from the same rounded inputs, float32
    sums over V. Gradients: written in the input dtype (and, for 16-bit inputs, the logit
    gradient staged in the weight dtype before the GEMMs), so 16-bit tolerances are relative to
    the gradient's scale."""
    loss = dict(rtol=3e-5, atol=3e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-5)
    if dtype == F32:
        grad = dict(rtol=3e-4, atol=3e-6) if device == "cpu" else \
            dict(rtol=2e-4, atol=2e-4 * grad_scale)
        return loss, grad
    if device != "cpu":
        loss = dict(rtol=1e-3, atol=1e-4)
    if dtype == F16:
        return loss, dict(rtol=2e-3, atol=max(2e-4, 2e-3 * grad_scale))
    return loss, dict(rtol=2e-2, atol=max(2e-4, 2e-2 * grad_scale))


def check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, grad_out=None,
          teacher_logits=None, chunk_size=None, vocab_chunk_size=None, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None
              for x in (hs, ws, bs)]
    dense = teacher_logits is not None
    loss = fd.linear_distill_loss(
        leaves[0], leaves[1], None if dense else ht, None if dense else wt, labels,
        student_bias=leaves[2], teacher_bias=None if dense else bt,
        teacher_logits=teacher_logits, backend=backend, mode=mode, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size, **kw)
    ref_leaves = [x.detach().cpu().double().requires_grad_() if x is not None else None
                  for x in (hs, ws, bs)]
    ref = reference(*ref_leaves, ht, wt, bt, labels, teacher_logits=teacher_logits, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.to(device=loss.device, dtype=loss.dtype))
    ref.backward(grad_out.cpu().double())
    what = f"{device}/{mode}/{backend} {dtype} {kw}"
    assert loss.dtype == torch.float32
    for name, a, r in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if a is None:
            continue
        loss_tol, grad_tol = tolerances(device, dtype, float(r.grad.abs().max()) or 1.0)
        assert a.grad.dtype == a.dtype, (name, what)
        assert_close(a.grad, r.grad, **grad_tol, what=f"grad {name} {what}")
    assert_close(loss.detach(), ref.detach(), **loss_tol, what=f"loss {what}")
    return loss, leaves


DIV_BETA = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0),
            ("skew_forward_kl", 0.2), ("skew_reverse_kl", 0.7), ("tvd", 0.5),
            ("symmetric_kl", 0.3)]


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
@pytest.mark.parametrize("divergence,beta", DIV_BETA)
def test_divergences(device, backend, dtype, mode, divergence, beta):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype)
    labels[2] = -100
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, divergence=divergence,
          beta=beta, temperature=1.7, hard_weight=0.4, t2_scale=True, chunk_size=4)


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("tvd", 0.5)])
def test_divergences_softcap_biases_ignored_rows(device, backend, dtype, mode, divergence,
                                                 beta):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, teacher_bias=True, seed=11)
    labels[::7] = -100
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, divergence=divergence,
          beta=beta, temperature=1.7, t2_scale=True, hard_weight=0.3, student_softcap=20.0,
          teacher_softcap=25.0, chunk_size=4 if device == "cpu" else 64,
          vocab_chunk_size=None if device == "cpu" else 300)


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_softcap_biases(device, backend, dtype, mode, reduction):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, teacher_bias=True)
    labels[::3] = -100
    go = torch.rand(labels.shape) + 0.5 if reduction == "none" else torch.tensor(1.3)
    loss, _ = check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, grad_out=go,
                    reduction=reduction, student_softcap=4.0, teacher_softcap=6.0,
                    divergence="jsd", hard_weight=0.5, temperature=1.0, chunk_size=5)
    if reduction == "none":
        assert torch.all(loss.detach()[labels == -100] == 0)


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
def test_reduction_none_default_chunks_no_bias(device, backend, dtype, mode):
    hs, ws, _, ht, wt, _, labels = make(device, dtype, seed=11)
    N = labels.shape[0]
    labels[3] = -100
    go = torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5
    loss, _ = check(device, backend, dtype, mode, hs, ws, None, ht, wt, None, labels,
                    grad_out=go, reduction="none", divergence="skew_forward_kl", beta=0.2)
    assert loss.shape == (N,) and float(loss.detach()[3]) == 0.0


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
def test_padded_vocabularies(device, backend, dtype, mode):
    """Student 61 columns, teacher 57, real vocabulary 50: padding never matters."""
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, V=50, Vs=61, Vt=57)
    _, leaves = check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels,
                      vocab_size=50, divergence="forward_kl", hard_weight=0.3, temperature=2.0)
    assert torch.all(leaves[1].grad[50:] == 0) and torch.all(leaves[2].grad[50:] == 0)


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
def test_dense_teacher_logits(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype)
    t_logits = (ht @ wt.t()) * 1.5
    kept = t_logits.clone()
    check(device, backend, dtype, mode, hs, ws, bs, None, None, None, labels,
          teacher_logits=t_logits, divergence="reverse_kl", teacher_softcap=5.0,
          hard_weight=0.2)
    assert torch.equal(t_logits, kept), "the teacher's logits must not be modified"


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
def test_teacher_logits(device, backend, dtype, mode):
    """Precomputed teacher logits in the inputs' dtype, softcapped on a copy."""
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, seed=11)
    t = (ht.double() @ wt.double().t() * 1.3).to(dtype)
    labels[5] = -100
    kept = t.clone()
    check(device, backend, dtype, mode, hs, ws, bs, None, None, None, labels, teacher_logits=t,
          teacher_softcap=15.0, divergence="reverse_kl", hard_weight=0.2, temperature=2.0)
    assert torch.equal(t, kept), "the teacher's logits must not be modified"


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
def test_teacher_logits_padding_rows_all_neg_inf(device, backend, dtype, mode):
    """Ignored padding rows of the teacher's logits that are all -inf (their statistics are
    NaN) change nothing: the loss and every gradient equal those with finite rows there, bit
    for bit, and the padding rows' grad_hidden is exactly 0."""
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, seed=11)
    N = labels.shape[0]
    t = (ht.double() @ wt.double().t() * 1.3).to(dtype)
    pad = [0, N // 2, N - 1]
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


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
def test_shapes_odd_sizes_and_leading_dims(device, backend, dtype, mode):
    # D and V not multiples of any tile, 3-D inputs, one token
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, Ds=19, Dt=33, V=37, lead=(2, 3))
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels,
          divergence="skew_forward_kl", beta=0.4, reduction="none", chunk_size=4)
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, N=1, V=45)
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, divergence="tvd")


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F16,)))
def test_fp16_inputs(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype)
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels,
          divergence="forward_kl", hard_weight=0.5)


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((BF16,), modes=("chunked",)))
def test_bf16_chunked(device, backend, dtype, mode):
    """bf16 weights and hidden states; the logits are formed in float32, never rounded."""
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, V=300)
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, divergence="jsd")


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases())
def test_chunk_size_does_not_change_the_result(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, N=17)
    res = []
    for c in (1, 6, 17, 1000):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, student_bias=leaves[2],
                                      backend=backend, mode=mode, chunk_size=c,
                                      vocab_chunk_size=None if c == 1000 else 16 * c,
                                      divergence="jsd", hard_weight=0.5)
        loss.backward()
        res.append([loss.detach()] + [x.grad for x in leaves])
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            assert_close(a, b, rtol=1e-5, atol=1e-7, what="chunk size")


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
def test_all_ignored_and_no_grad(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, torch.full_like(labels, -100),
                                  student_bias=leaves[2], teacher_bias=bt, hard_weight=1.0,
                                  divergence="jsd", backend=backend, mode=mode)
    loss.backward()
    assert float(loss.detach()) == 0.0
    for name, x in zip(("hidden", "weight", "bias"), leaves):
        assert torch.all(x.grad == 0), f"grad {name}: expected zeros when every row is ignored"
    with torch.no_grad():
        a = fd.linear_distill_loss(hs, ws, ht, wt, labels, backend=backend, mode=mode)
    b = fd.linear_distill_loss(hs, ws, ht, wt, labels, backend=backend, mode=mode)
    assert_close(a, b.detach(), rtol=1e-6, atol=1e-7, what="no-grad forward")


@pytest.mark.parametrize("device,backend,dtype,mode", linear_cases((F32, BF16)))
def test_deterministic(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype)
    out = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, backend=backend,
                                      mode=mode, divergence="tvd", hard_weight=0.2)
        loss.backward()
        out.append([loss.detach()] + [x.grad for x in leaves])
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend,dtype,mode",
                         linear_cases((F32, BF16), modes=("fused",)))
def test_fused_equal_to_chunked(device, backend, dtype, mode):
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, seed=11)
    out = []
    for m in ("fused", "chunked"):
        leaves = [x.clone().requires_grad_() for x in (hs, ws)]
        loss = fd.linear_distill_loss(leaves[0], leaves[1], ht, wt, labels, divergence="tvd",
                                      hard_weight=0.2, backend="triton", mode=m)
        loss.backward()
        out.append([loss.detach()] + [x.grad for x in leaves])
    loss_tol, _ = tolerances(device, dtype, 1.0)
    assert_close(out[0][0], out[1][0], **loss_tol, what="fused vs chunked loss")
    for a, b in zip(out[0][1:], out[1][1:]):
        _, grad_tol = tolerances(device, dtype, float(b.abs().max()) or 1.0)
        assert_close(a, b, **grad_tol, what="fused vs chunked grads")


# ---- the 16-bit CUDA path of the chunked mode (the ring), also on CPU tensors ------------------

@pytest.fixture
def ring_on_cpu(monkeypatch):
    """The ring path for 16-bit weights on CPU tensors too (its logic; the GEMMs are torch's)."""
    monkeypatch.setattr(_chunked, "RING_DEVICES", ("cuda", "meta", "cpu"))
    return monkeypatch


RING_BUDGETS = {"one ring": 1 << 40, "several rings": 1}


@pytest.mark.parametrize("device,backend,dtype,mode",
                         linear_cases((BF16, F16), modes=("chunked",), only=("torch", "cpu",
                                                                            "triton")))
@pytest.mark.parametrize("budget", list(RING_BUDGETS))
@pytest.mark.parametrize("case", ["plain", "softcap+none"])
def test_ring_path(ring_on_cpu, device, backend, dtype, mode, budget, case):
    """A single ring (grad_weight from one GEMM into the weight dtype) or a ring per chunk
    (grad_weight accumulated in two 16-bit planes for bf16, a float32 buffer for fp16); the
    triton backend writes the 16-bit gradient straight into the ring unless per-row factors or
    a softcap need the float32 gradient first."""
    ring_on_cpu.setattr(_chunked, "GPU_BUDGET", RING_BUDGETS[budget])
    hs, ws, bs, ht, wt, bt, labels = make(device, dtype, N=23, teacher_bias=True)
    labels[3] = -100
    kw = dict(divergence="jsd", hard_weight=0.3, chunk_size=4 if device == "cpu" else 32)
    go = None
    if case == "softcap+none":
        kw.update(student_softcap=4.0, teacher_softcap=6.0, reduction="none")
        go = torch.rand(labels.shape) + 0.5
    check(device, backend, dtype, mode, hs, ws, bs, ht, wt, bt, labels, grad_out=go, **kw)


def test_plan_chunks_within_the_memory_goal():
    """At the headline size (N = 8192, V = 128256, D = 4096, bf16 on a GPU with room) the
    chunked mode's buffers, ring and low plane stay within 2 GB; one ring holds every row when
    the budget allows it; CPU float32 keeps one chunk per ring."""
    N, V, D = 8192, 128256, 4096
    w = torch.empty(V, D, dtype=BF16, device="meta")
    h = torch.empty(N, D, dtype=BF16, device="meta")
    c, ring = _chunked.plan_chunks(N, V, w, h, 2)
    assert c % 64 == 0 and ring % c == 0 and ring < N
    extra = 2 * c * V * 4 + ring * _chunked._round_up(V, 16) * 2 + V * D * 2
    assert extra <= 2e9, extra
    c2, ring2 = _chunked.plan_chunks(1024, V, w, h[:1024], 2)
    assert ring2 >= 1024  # 2 x 512 x V x 4 + 1024 x V x 2 fits: grad_weight in one GEMM
    c3, ring3 = _chunked.plan_chunks(4096, 65536, torch.empty(65536, 256), torch.empty(4096, 256),
                                     2)
    assert c3 == ring3


# ---- the GEMM with the accumulating epilogue ----------------------------------------------------

def _gemm_devices():
    out = []
    if "triton" in BACKENDS:
        out.append(pytest.param("cpu", id="cpu-interpreter"))
    out.append(pytest.param("cuda", id="gpu", marks=pytest.mark.gpu))
    return out


def _planes(hi, lo):
    return ((hi.view(torch.int16).to(torch.int32) << 16) |
            (lo.to(torch.int32) & 0xFFFF)).view(torch.float32)


@pytest.mark.parametrize("device", _gemm_devices())
def test_mm_into_split_planes_are_float32_accumulation(device):
    """Three launches over K slices: the planes hold the float32 sum exactly (each launch adds
    its float32 product to the float32 value of the planes), and the last launch rounds it to
    bfloat16 as Tensor.to does (round to nearest even); transposed A as grad_weight uses it."""
    from fastdistill.kernels import linear as K
    g = torch.Generator().manual_seed(5)
    M, N, Ks = 70, 45, (29, 64, 7)
    dt = F32 if device == "cpu" else BF16  # the interpreter has no bf16 arithmetic
    As = [torch.randn(k, M, generator=g).to(dt).to(device).t() for k in Ks]  # strided A
    Bs = [torch.randn(k, N, generator=g).to(dt).to(device) for k in Ks]
    hi = torch.empty(M, N, dtype=BF16, device=device)
    lo = torch.empty(M, N, dtype=torch.int16, device=device)
    acc = torch.zeros(M, N, dtype=F32, device=device)
    for i, (a, b) in enumerate(zip(As, Bs)):
        epi = K.EPI_SPLIT_FIRST if i == 0 else (K.EPI_SPLIT_LAST if i == 2 else K.EPI_SPLIT_ADD)
        before = _planes(hi, lo).clone() if i else torch.zeros_like(acc)
        K.mm_into(a, b, hi, epi, lo)
        prod = torch.empty(M, N, dtype=F32, device=device)
        K.mm_into(a, b, prod)  # the kernel's own float32 product (same tiles, same order)
        if i < 2:
            assert torch.equal(_planes(hi, lo), before + prod), i
        else:
            assert torch.equal(hi, (before + prod).to(BF16))
        acc += a.float() @ b.float()
    assert_close(hi.float(), acc, rtol=2 ** -8, atol=1e-3, what="planes vs float32 sum")


@pytest.mark.parametrize("device", _gemm_devices())
def test_mm_into_rounding_and_special_values(device):
    """The last epilogue's rounding is bfloat16's (ties to even, overflow to inf, NaN kept);
    EPI_ADD adds to a float32 C in place; EPI_STORE writes C's dtype."""
    from fastdistill.kernels import linear as K
    # (-0.0 + a zero product is +0.0, and subnormals may be flushed on the GPU: left out)
    vals = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.3895e38,
                         -3.3895e38, float("inf"), float("-inf"), float("nan"), 0.0,
                         1.00390625, 65504.0, 1e-30], device=device)
    M = vals.numel()
    a = torch.zeros(M, 1, device=device)
    b = torch.zeros(1, 1, device=device)
    hi = torch.empty(M, 1, dtype=BF16, device=device)
    lo = torch.empty(M, 1, dtype=torch.int16, device=device)
    bits = vals.view(torch.int32)
    hi.view(torch.int16).copy_((bits >> 16).to(torch.int16).view(M, 1))
    lo.copy_(bits.to(torch.int16).view(M, 1))
    K.mm_into(a, b, hi, K.EPI_SPLIT_LAST, lo)  # adds 0, rounds
    want = vals.to(BF16).view(M, 1)
    same = (hi.view(torch.int16) == want.view(torch.int16)) | (hi.isnan() & want.isnan())
    assert same.all(), (hi.flatten(), want.flatten())
    c = torch.ones(3, 2, device=device)
    x = torch.randn(3, 5, device=device)
    y = torch.randn(5, 2, device=device)
    K.mm_into(x, y, c, K.EPI_ADD)
    assert_close(c, 1 + x @ y, rtol=1e-5, atol=1e-5, what="EPI_ADD")


# ---- API-level tests ----------------------------------------------------------------------------

def test_module():
    hs, ws, bs, ht, wt, bt, labels = make(lead=(2, 4))
    mod = fd.LinearDistillLoss(divergence="jsd", temperature=2.0, hard_weight=0.5)
    a = mod(hs, ws, ht, wt, labels, student_bias=bs)
    b = fd.linear_distill_loss(hs, ws, ht, wt, labels, student_bias=bs, divergence="jsd",
                               temperature=2.0, hard_weight=0.5)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="unknown option"):
        fd.LinearDistillLoss(temprature=2.0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton interpreter")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_liger_fused_linear_jsd(beta):
    liger = pytest.importorskip("liger_kernel.transformers.fused_linear_jsd",
                                reason="Liger-Kernel not installed")
    hs, ws, _, ht, wt, _, labels = make(N=8, Ds=32, Dt=32, V=64, bias=False)
    labels[1] = -100
    a = hs.clone().requires_grad_()
    wa = ws.clone().requires_grad_()
    ours = fd.linear_distill_loss(a, wa, ht, wt, labels, divergence="jsd", beta=beta,
                                  temperature=2.0, backend="cpu" if "cpu" in BACKENDS else "torch")
    ours.backward()
    b = hs.clone().requires_grad_()
    wb = ws.clone().requires_grad_()
    theirs = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=2.0)(b, wb, ht, wt, labels)
    theirs.backward()
    assert_close(ours, theirs, rtol=1e-4, atol=1e-5, what="loss vs LigerFusedLinearJSD")
    assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, what="hidden grad vs Liger")
    assert_close(wa.grad, wb.grad, rtol=1e-3, atol=1e-5, what="weight grad vs Liger")


def test_bad_input():
    hs, ws, bs, ht, wt, bt, labels = make()
    f = fd.linear_distill_loss
    with pytest.raises(ValueError, match=r"student_weight has 23 input features"):
        f(hs, ws[:, :23], ht, wt)
    with pytest.raises(ValueError, match=r"teacher_weight has 39 input features"):
        f(hs, ws, ht, wt[:, :39])
    with pytest.raises(ValueError, match="pass vocab_size"):
        f(hs, ws, ht, wt[:50])
    with pytest.raises(ValueError, match="teacher_hidden has leading shape"):
        f(hs, ws, ht[:5], wt)
    with pytest.raises(ValueError, match="not both"):
        f(hs, ws, ht, wt, teacher_logits=torch.randn(11, 53))
    with pytest.raises(ValueError, match="the teacher is needed"):
        f(hs, ws)
    with pytest.raises(ValueError, match="must be a 2-D"):
        f(hs, ws[0], ht, wt)
    with pytest.raises(ValueError, match=r"student_bias must have shape \[53\]"):
        f(hs, ws, ht, wt, student_bias=torch.zeros(52))
    with pytest.raises(ValueError, match="student_softcap must be a positive"):
        f(hs, ws, ht, wt, student_softcap=0.0)
    with pytest.raises(TypeError, match="teacher_softcap must be a positive number"):
        f(hs, ws, ht, wt, teacher_softcap="30")
    with pytest.raises(ValueError, match="mode must be one of"):
        f(hs, ws, ht, wt, mode="tiled")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="labels must have the logits' leading shape"):
        f(hs, ws, ht, wt, labels[:4])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        f(hs, ws, ht, wt, torch.full_like(labels, 60), hard_weight=1.0)
    with pytest.raises(fd.BackendUnavailableError, match="mode='fused' runs on the triton"):
        f(hs, ws, ht, wt, backend="torch", mode="fused")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        f(hs, ws, ht, wt, temperature=-1.0)
    with pytest.raises(ValueError, match="student_weight is on meta but student_hidden is on cpu"):
        f(hs, ws.to("meta"), ht, wt)
    with pytest.raises(ValueError, match="teacher_bias is on meta but student_hidden is on cpu"):
        f(hs, ws, ht, wt, teacher_bias=torch.zeros(53, device="meta"))
    assert math.isfinite(float(f(hs, ws, ht, wt, labels)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16], ids=["bf16"])
def test_chunked_peak_memory_follows_the_plan(dtype):
    """On a GPU, the chunked mode's peak extra memory (beyond inputs and gradients) at N =
    2048, V = 32000, D = 1024 stays within its plan (buffers, ring, low plane) plus 64 MiB."""
    N, V, D = 2048, 32000, 1024
    hs, ws, _, ht, wt, _, labels = make("cuda", dtype, N=N, Ds=D, Dt=D, V=V, bias=False)
    hs.requires_grad_()
    ws.requires_grad_()
    c, ring = _chunked.plan_chunks(N, V, ws, hs, 2)
    planned = 2 * c * V * 4 + min(ring, N) * _chunked._round_up(V, 16) * 2 + \
        (V * D * 2 if ring < N else 0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fd.linear_distill_loss(hs, ws, ht, wt, labels, divergence="jsd").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (N * D + V * D) * 2
    assert extra <= planned + (64 << 20), (extra, planned)
