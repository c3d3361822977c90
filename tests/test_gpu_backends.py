"""The fused GPU backends (cuda: csrc/cuda/, triton: fastdistill/kernels/) on CUDA tensors against the float64
references, at the shapes where GPU kernels go wrong: odd and 128k-wide rows, misaligned rows,
padding, -inf columns, aliasing of the gradient with the student, and bitwise determinism.

Every test here carries the gpu mark and is skipped without a CUDA device (conftest.py), except
the argument checks at the end, which run anywhere."""

import math

import pytest
import torch

import fastdistill as fd
from fastdistill import backends
from fastdistill.divergences import make_options
from fastdistill.feature import reference_feature_loss
from util import GPU, GRAD_TOL, LOSS_TOL, assert_close, gpu_backends, logits, run_both

BACKENDS = gpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
gpu = pytest.mark.gpu


def dev_logits(shape, dtype=torch.float32, scale=3.0):
    return logits(shape, dtype, scale, device=GPU)


def tolerances(dtype):
    """Loss and gradient tolerances for inputs of `dtype` (the reference sees the same rounded
    inputs; the gradient is written in `dtype`: one rounding of each element)."""
    if dtype == torch.float32:
        return LOSS_TOL, GRAD_TOL
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    return LOSS_TOL, dict(rtol=eps, atol=1e-5)


def check(backend, s, t, labels=None, grad_out=None, **kw):
    loss_tol, grad_tol = tolerances(s.dtype)
    loss, grad, ref, ref_grad = run_both(s, t, labels, grad_out, backend=backend, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    assert_close(loss, ref, **loss_tol, what=f"{backend} loss {kw}")
    assert_close(grad, ref_grad, **grad_tol, what=f"{backend} grad {kw}")
    return loss, grad


def direct(backend, s, t, labels=None, *, vocab=None, need_grad=True, grad_out=None,
           scale=1.0, **kw):
    """The backend's distill_forward on 2-D tensors: (loss rows, gradient)."""
    opts = make_options(**kw)
    gs = torch.tensor(scale, dtype=torch.float32, device=s.device)
    return backends.get(backend).distill_forward(
        s, t, labels, opts, vocab if vocab is not None else s.shape[1], gs, need_grad, grad_out)


DIV_BETA = [(d, b) for d in fd.DIVERGENCES for b in ((0.0, 0.3, 1.0) if d in (
    "jsd", "skew_forward_kl", "skew_reverse_kl") else (0.3,))]


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence,beta", DIV_BETA)
def test_divergences_dtypes(backend, dtype, divergence, beta):
    s, t = dev_logits((5, 3001), dtype), dev_logits((5, 3001), dtype)
    check(backend, s, t, divergence=divergence, beta=beta)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
@pytest.mark.parametrize("temperature,t2", [(0.5, False), (2.5, True), (1.0, False)])
def test_temperature_hard_mix_ignore(backend, dtype, divergence, temperature, t2):
    N, V = 6, 2053
    s, t = dev_logits((N, V), dtype), dev_logits((N, V), dtype)
    labels = torch.randint(0, V, (N,), device=GPU)
    labels[1] = -100
    labels[4] = V - 1  # the last column, in the partial last unit
    loss, grad = check(backend, s, t, labels, divergence=divergence, beta=0.7,
                       temperature=temperature, t2_scale=t2, hard_weight=0.4, soft_weight=0.6,
                       reduction="none", grad_out=torch.rand(N, device=GPU) + 0.5)
    assert loss[1] == 0 and torch.all(grad[1] == 0), "ignored rows: zero loss and gradient"


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_only_matches_cross_entropy(backend):
    s, t = dev_logits((7, 999)), dev_logits((7, 999))
    labels = torch.randint(0, 999, (7,), device=GPU)
    labels[2] = 3
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, labels, hard_weight=1.0, soft_weight=0.0, ignore_index=3,
                           temperature=2.0, backend=backend)
    loss.backward()
    s2 = s.double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(s2, labels, ignore_index=3)
    ce.backward()
    assert_close(loss, ce, **LOSS_TOL, what="hard-only loss")
    assert_close(sg.grad, s2.grad, **GRAD_TOL, what="hard-only grad")


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_padding_is_never_read(backend, dtype):
    N, V = 4, 1000
    s, t = dev_logits((N, V + 24), dtype), dev_logits((N, V + 5), dtype)
    s[:, V:] = math.nan  # anything read from the padding would show up as NaN
    t[:, V:] = math.nan
    labels = torch.randint(0, V, (N,), device=GPU)
    loss, grad = check(backend, s, t, labels, vocab_size=V, divergence="jsd", hard_weight=0.3)
    assert torch.isfinite(loss)
    assert torch.all(grad[:, V:] == 0)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
def test_neg_inf_columns(backend, divergence):
    N, V = 4, 777
    s, t = dev_logits((N, V)), dev_logits((N, V))
    cols = torch.randperm(V - 1, device=GPU)[: V // 3] + 1
    cols = cols[cols != 5]
    s[:, cols] = -math.inf
    t[:, cols] = -math.inf
    s[0, :] = -math.inf  # row 0: a single finite column on both sides
    t[0, :] = -math.inf
    s[0, 5], t[0, 5] = 2.0, -1.0
    labels = torch.zeros(N, dtype=torch.long, device=GPU)
    labels[0] = 5
    loss, grad = check(backend, s, t, labels, divergence=divergence, beta=0.4, hard_weight=0.5,
                       temperature=1.5, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.all(grad[:, cols] == 0)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_row_odd_vocab(backend, dtype):
    check(backend, dev_logits((1, 50257), dtype), dev_logits((1, 50257), dtype),
          divergence="forward_kl")
    # several rows of an odd width: every row but the first starts misaligned
    labels = torch.randint(0, 50257, (5,), device=GPU)
    check(backend, dev_logits((5, 50257), dtype), dev_logits((5, 50257), dtype), labels,
          divergence="skew_reverse_kl", beta=0.2, hard_weight=0.5, temperature=1.3)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_llama3_wide_rows(backend, divergence):
    V = 128256
    s, t = dev_logits((3, V), torch.bfloat16), dev_logits((3, V), torch.bfloat16)
    labels = torch.randint(0, V, (3,), device=GPU)
    check(backend, s, t, labels, divergence=divergence, hard_weight=0.2, temperature=2.0)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_strided_rows(backend, dtype):
    N, V = 6, 1531
    big_s, big_t = dev_logits((N, V + 9), dtype), dev_logits((2 * N, V + 3), dtype)
    s, t = big_s[:, 1:V + 1], big_t[::2, 3:]  # odd offsets and row strides
    labels = torch.randint(0, V, (N,), device=GPU)
    loss, grad = check(backend, s, t, labels, divergence="jsd", hard_weight=0.3,
                       reduction="none")
    if backend == "cuda":  # the same values as aligned copies, bit for bit
        loss2, grad2 = direct(backend, s.contiguous(), t.contiguous(), labels, divergence="jsd",
                              hard_weight=0.3, reduction="none")
        loss1, grad1 = direct(backend, s, t, labels, divergence="jsd", hard_weight=0.3,
                              reduction="none")
        assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes(backend):
    for sd, td in [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                   (torch.float16, torch.bfloat16)]:
        s, t = dev_logits((4, 1000), sd), dev_logits((4, 1000), td)
        check(backend, s, t, divergence="reverse_kl")


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_forward_kl", "tvd"])
def test_gradient_written_over_student(backend, dtype, divergence):
    """grad_out = student: each element is read before it is overwritten; the result is the
    gradient of the original logits, bitwise equal to a separate buffer."""
    N, V = 5, 4099
    s, t = dev_logits((N, V), dtype), dev_logits((N, V), dtype)
    labels = torch.randint(0, V, (N,), device=GPU)
    kw = dict(divergence=divergence, hard_weight=0.5, temperature=1.7, beta=0.3)
    loss1, grad1 = direct(backend, s, t, labels, **kw)
    buf = s.clone()
    loss2, grad2 = direct(backend, buf, t, labels, grad_out=buf, **kw)
    assert grad2.data_ptr() == buf.data_ptr()
    assert torch.equal(loss1, loss2) and torch.equal(grad1, buf)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
def test_deterministic(backend, divergence):
    s, t = dev_logits((8, 20011), torch.bfloat16), dev_logits((8, 20011), torch.bfloat16)
    labels = torch.randint(0, 20011, (8,), device=GPU)
    outs = [direct(backend, s, t, labels, divergence=divergence, hard_weight=0.3,
                   temperature=0.8) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@gpu
def test_cuda_row_does_not_depend_on_the_batch():
    """A row gives bitwise the same result alone and inside a batch (no cross-row state, and
    the aligned and misaligned load paths feed the same values to the same threads)."""
    if "cuda" not in BACKENDS:
        pytest.skip("the cuda backend is not built")
    V = 10007
    s, t = dev_logits((9, V)), dev_logits((9, V))
    full = direct("cuda", s, t, divergence="tvd")
    part = direct("cuda", s[3:5], t[3:5], divergence="tvd")
    assert torch.equal(full[0][3:5], part[0]) and torch.equal(full[1][3:5], part[1])


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_only_and_grad_scale_on_device(backend):
    s, t = dev_logits((6, 3000)), dev_logits((6, 3000))
    with torch.no_grad():
        loss = fd.distill_loss(s, t, divergence="jsd", reduction="none", backend=backend)
    ref = fd.divergences.reference_distill_loss(s.double(), t.double(), divergence="jsd",
                                                reduction="none")
    assert_close(loss, ref, **LOSS_TOL, what="loss without gradient")
    rows, grad = direct(backend, s, t, divergence="forward_kl", scale=0.25)
    _, grad1 = direct(backend, s, t, divergence="forward_kl", scale=1.0)
    assert_close(grad, grad1 * 0.25, rtol=1e-6, atol=0, what="grad_scale read on the device")


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_out_of_range_give_nan(backend):
    """On the GPU the range check would synchronise; the kernels give NaN rows instead."""
    s, t = dev_logits((3, 500)), dev_logits((3, 500))
    labels = torch.tensor([2, 500, -7], device=GPU)
    loss, grad = direct(backend, s, t, labels, hard_weight=1.0, reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and torch.isnan(loss[2])
    if backend == "cuda":  # the contract of the CPU kernel: no reads, zero gradient
        assert torch.all(grad[1:] == 0)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    s, t = dev_logits((3, 600)), dev_logits((3, 600))
    s[1, 17] = math.nan
    loss = fd.distill_loss(s, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isfinite(loss[2])


# ---- feature losses ---------------------------------------------------------------------------

def run_feature(backend, s, t, **kw):
    sg = s.clone().requires_grad_()
    loss = fd.feature_loss(sg, t, backend=backend, **kw)
    s64 = s.double().requires_grad_()
    ref = reference_feature_loss(s64, t, **kw)
    go = torch.rand_like(ref) + 0.5
    loss.backward(go.float())
    ref.backward(go)
    return loss.detach(), sg.grad, ref.detach(), s64.grad


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", fd.FEATURE_KINDS)
# 40: one warp; 4096: the benchmark width; 1000: a partial unit; 8192: the widest row kept in
# registers; 8200 and 20000: streamed rows
@pytest.mark.parametrize("D", [40, 1000, 4096, 8192, 8200, 20000])
def test_feature_kinds(backend, dtype, kind, D):
    N = 5
    s, t = dev_logits((N, D), dtype, 1.0) + 0.5, dev_logits((N, D), dtype, 1.0)
    t[1] = s[1]  # identical rows
    mask = torch.tensor([True, True, False, True, True], device=GPU)
    loss, grad, ref, ref_grad = run_feature(backend, s, t, kind=kind, mask=mask,
                                            reduction="none")
    _, grad_tol = tolerances(dtype)
    assert_close(loss, ref, rtol=1e-5, atol=1e-5, what=f"{kind} D={D} loss")
    assert_close(grad, ref_grad, **grad_tol, what=f"{kind} D={D} grad")
    assert loss[2] == 0 and torch.all(grad[2] == 0)


@gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_strided_mixed_deterministic(backend):
    big = dev_logits((6, 3000), torch.bfloat16, 1.0)
    s = big[:, 3:2003]  # misaligned rows
    t = dev_logits((6, 2000), torch.float32, 1.0)
    for kind in fd.FEATURE_KINDS:
        loss, grad, ref, ref_grad = run_feature(backend, s, t, kind=kind)
        assert_close(loss, ref, rtol=1e-5, atol=1e-5, what=f"{kind} loss")
        assert_close(grad, ref_grad, rtol=2 ** -8, atol=1e-6, what=f"{kind} grad")
        again = run_feature(backend, s, t, kind=kind)
        assert torch.equal(loss, again[0]) and torch.equal(grad, again[1])


# ---- in-place gradient scaling (backward) -----------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_scale_rows(dtype):
    if "cuda" not in BACKENDS:
        pytest.skip("the cuda backend is not built")
    from fastdistill.backends.cuda_backend import scale_rows_
    g = dev_logits((5, 1003), dtype)
    f = torch.tensor([1.0, 2.0, -0.5, 1.0, 3.0], device=GPU)
    got = g.clone()
    scale_rows_(got, f)
    assert torch.equal(got, (g.float() * f[:, None]).to(dtype))
    got = g.clone()
    scale_rows_(got, torch.tensor(0.25, device=GPU))
    assert torch.equal(got, (g.float() * 0.25).to(dtype))
    got = g.clone()
    scale_rows_(got, torch.tensor(1.0, device=GPU))
    assert torch.equal(got, g)


# ---- argument checks of the cuda backend (no GPU needed) ---------------------------------------

def test_cuda_backend_rejects_cpu_tensors():
    from fastdistill.backends import cuda_backend
    s = torch.randn(2, 8)
    opts = make_options()
    with pytest.raises(ValueError, match="student_logits is on cpu"):
        cuda_backend.distill_forward(s, s, None, opts, 8, torch.ones(()), True)
    with pytest.raises(ValueError, match="student is on cpu"):
        cuda_backend.feature_forward(s, s, None, 0, torch.ones(()), True)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        cuda_backend.distill_forward([1.0], s, None, opts, 8, torch.ones(()), True)


@gpu
def test_cuda_backend_argument_checks():
    if "cuda" not in BACKENDS:
        pytest.skip("the cuda backend is not built")
    from fastdistill.backends import cuda_backend as cb
    s, t = dev_logits((4, 16)), dev_logits((4, 16))
    opts, one = make_options(), torch.ones((), device=GPU)
    with pytest.raises(ValueError, match="teacher_logits is on cpu"):
        cb.distill_forward(s, t.cpu(), None, opts, 16, one, True)
    with pytest.raises(ValueError, match="unit stride"):
        cb.distill_forward(s, dev_logits((16, 4)).t(), None, opts, 16, one, True)
    with pytest.raises(TypeError, match="labels must be torch.int64"):
        cb.distill_forward(s, t, torch.zeros(4, dtype=torch.int32, device=GPU), opts, 16, one,
                           True)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        cb.distill_forward(s, t, torch.zeros(3, dtype=torch.int64, device=GPU), opts, 16, one,
                           True)
    with pytest.raises(TypeError, match="grad_out must be torch.float32"):
        cb.distill_forward(s, t, None, opts, 16, one, True, grad_out=s.half())
    with pytest.raises(ValueError, match="overlapping rows"):
        cb.distill_forward(s, t, None, opts, 16, one, True,
                           grad_out=torch.zeros(16, device=GPU).expand(4, 16))
    with pytest.raises(ValueError, match="vocab must be in"):
        cb.distill_forward(s, t, None, opts, 17, one, True)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        cb.feature_forward(s, t, torch.ones(4, device=GPU), 0, one, True)
