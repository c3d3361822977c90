"""distill_loss on every CPU-testable backend against the float64 reference."""

import math

import pytest
import torch

import fastdistill as fd
from util import GRAD_TOL, LOSS_TOL, assert_close, cpu_backends, logits, run_both, small

BACKENDS = cpu_backends()
DIVS = fd.DIVERGENCES


def shape(backend, big=(6, 333)):
    return (5, 67) if small(backend) else big


def check(backend, s, t, labels=None, grad_out=None, loss_tol=LOSS_TOL, grad_tol=GRAD_TOL, **kw):
    loss, grad, ref, ref_grad = run_both(s, t, labels, grad_out, backend=backend, **kw)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, **loss_tol, what=f"{backend} loss {kw}")
    assert_close(grad, ref_grad, **grad_tol, what=f"{backend} grad {kw}")
    assert grad.dtype == s.dtype
    return loss, grad


# beta matters for jsd and skew_* only: endpoints and an interior value for those
DIV_BETA = [(d, b) for d in DIVS for b in ((0.0, 0.3, 1.0) if d in ("jsd", "skew_forward_kl",
                                                                   "skew_reverse_kl") else (0.3,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIV_BETA)
def test_divergences_and_beta(backend, divergence, beta):
    N, V = shape(backend)
    check(backend, logits((N, V)), logits((N, V)), divergence=divergence, beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("temperature,t2", [(0.5, False), (2.5, True), (1.0, True)])
def test_temperature_hard_mix(backend, divergence, temperature, t2):
    N, V = shape(backend)
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    check(backend, logits((N, V)), logits((N, V)), labels, divergence=divergence, beta=0.7,
          temperature=temperature, t2_scale=t2, hard_weight=0.4, soft_weight=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_only_matches_cross_entropy(backend):
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    labels = torch.randint(0, V, (N,))
    labels[0] = 7  # custom ignore_index below
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, labels, hard_weight=1.0, soft_weight=0.0, ignore_index=7,
                           temperature=3.0, backend=backend)
    loss.backward()
    s2 = s.double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(s2, labels, ignore_index=7)
    ce.backward()
    assert_close(loss, ce, **LOSS_TOL, what="hard-only loss vs F.cross_entropy")
    assert_close(sg.grad, s2.grad, **GRAD_TOL, what="hard-only grad vs F.cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_matches_torch_kl_div(backend):
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, t, temperature=2.0, backend=backend)
    loss.backward()
    s2 = s.double().requires_grad_()
    kl = torch.nn.functional.kl_div(torch.log_softmax(s2 / 2, -1), torch.log_softmax(
        t.double() / 2, -1), log_target=True, reduction="batchmean")
    kl.backward()
    assert_close(loss, kl, **LOSS_TOL, what="forward_kl vs F.kl_div")
    assert_close(sg.grad, s2.grad, **GRAD_TOL, what="forward_kl grad vs F.kl_div")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore(backend, reduction):
    N, V = shape(backend)
    labels = torch.randint(0, V, (N,))
    labels[::2] = -100
    grad_out = torch.rand(N) + 0.5 if reduction == "none" else None
    loss, grad = check(backend, logits((N, V)), logits((N, V)), labels, grad_out,
                       divergence="jsd", reduction=reduction, hard_weight=0.5)
    ignored = labels == -100
    assert torch.all(grad[ignored] == 0), "ignored rows must get exactly zero gradient"
    if reduction == "none":
        assert loss.shape == (N,) and torch.all(loss[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(backend, as_tensor):
    N, V = shape(backend)
    labels = torch.randint(0, V, (N,))
    labels[0] = -100
    n = torch.tensor(11) if as_tensor else 11
    check(backend, logits((N, V)), logits((N, V)), labels, divergence="reverse_kl",
          num_items_in_batch=n, hard_weight=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_not_nan(backend, reduction):
    N, V = shape(backend)
    labels = torch.full((N,), -100)
    s = logits((N, V)).requires_grad_()
    loss = fd.distill_loss(s, logits((N, V)), labels, reduction=reduction, hard_weight=1.0,
                           backend=backend)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    loss.sum().backward()
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_padding(backend):
    N, V = shape(backend)
    s = logits((N, V + 9))
    t = logits((N, V + 3))
    s[:, V:] = 1e4  # garbage in the padding must not matter
    labels = torch.randint(0, V, (N,))
    loss, grad = check(backend, s, t, labels, vocab_size=V, divergence="skew_forward_kl",
                       hard_weight=0.3)
    assert torch.all(grad[:, V:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_masked_vocabulary_neg_inf(backend, divergence):
    """-inf at the same columns of both (masked tokens): exact, finite, no mass there."""
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    cols = torch.randperm(V - 1)[: V // 3] + 1  # masked columns; column 0 stays real
    cols = cols[cols != 5]
    s[:, cols] = -math.inf
    t[:, cols] = -math.inf
    s[0, :] = -math.inf
    t[0, :] = -math.inf
    s[0, 5] = 2.0  # row 0: a single finite column on both sides
    t[0, 5] = -1.0
    labels = torch.zeros(N, dtype=torch.long)
    labels[0] = 5
    loss, grad = check(backend, s, t, labels, divergence=divergence, beta=0.4, hard_weight=0.5,
                       temperature=1.5, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.all(grad[:, cols] == 0), "masked columns must get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_forward_kl", "tvd"])
def test_teacher_neg_inf_only(backend, divergence):
    """Teacher rules out columns the student still scores: divergences that stay finite."""
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    t[:, ::4] = -math.inf
    loss, _ = check(backend, s, t, divergence=divergence, beta=0.5, reduction="none")
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_identical_distributions(backend, divergence):
    """P == Q: every divergence is 0 with zero gradient (tvd's sign(0) included)."""
    N, V = shape(backend)
    s = logits((N, V))
    sg = s.clone().requires_grad_()
    loss = fd.distill_loss(sg, s.clone(), divergence=divergence, beta=0.5, backend=backend)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-5
    assert sg.grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_ties_and_extremes(backend, divergence):
    N, V = shape(backend)
    s = torch.zeros(N, V)           # uniform student (all ties)
    t = logits((N, V), scale=1.0)
    t[1] = 0.0                      # uniform teacher in row 1
    t[2, :] = -3e4                  # huge negative offsets: softmax is shift-invariant
    t[2, 3] = 3e4                   # one dominant column
    s[3] = logits((V,), scale=50.0)  # very peaked student
    check(backend, s, t, divergence=divergence, beta=0.25, temperature=0.7,
          loss_tol=dict(rtol=1e-4, atol=1e-4), grad_tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row_and_leading_dims(backend):
    V = 37 if small(backend) else 50257
    check(backend, logits((1, V)), logits((1, V)), divergence="forward_kl")
    check(backend, logits((2, 3, 41)), logits((2, 3, 41)), torch.randint(0, 41, (2, 3)),
          divergence="tvd", hard_weight=0.1, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_vocab_large(backend):
    if small(backend):
        V = 1029  # not a multiple of any tile, more than one tile
        N = 2
    else:
        V, N = 50257, 3
    check(backend, logits((N, V)), logits((N, V)), divergence="skew_reverse_kl", beta=0.1)


# The Triton interpreter cannot do bf16 arithmetic (triton issue 11584): bf16 runs on the
# cpu/torch backends here and on every backend in the GPU tests.
HALF_CASES = [(b, d) for b in BACKENDS for d in (torch.bfloat16, torch.float16)
              if not (b == "triton" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", HALF_CASES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_half_inputs(backend, dtype, divergence):
    N, V = shape(backend)
    s, t = logits((N, V), dtype), logits((N, V), dtype)
    labels = torch.randint(0, V, (N,))
    # the gradient is written in the input dtype: one rounding of an O(1/N) value
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    check(backend, s, t, labels, divergence=divergence, hard_weight=0.5,
          grad_tol=dict(rtol=eps, atol=1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes(backend):
    N, V = shape(backend)
    s, t = logits((N, V), torch.float32), logits((N, V), torch.float16)
    check(backend, s, t, divergence="reverse_kl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
def test_deterministic(backend, divergence):
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    labels = torch.randint(0, V, (N,))
    outs = []
    for _ in range(2):
        sg = s.clone().requires_grad_()
        loss = fd.distill_loss(sg, t, labels, divergence=divergence, hard_weight=0.3,
                               backend=backend)
        loss.backward()
        outs.append((loss.detach(), sg.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    N, V = shape(backend)
    s, t = logits((N, V)), logits((N, V))
    s[1, 3] = math.nan
    loss = fd.distill_loss(s, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    N, V = shape(backend)
    big_s, big_t = logits((N, 2 * V)), logits((2 * N, V))
    s, t = big_s[:, :V], big_t[::2]  # row strides differ from V
    check(backend, s, t, divergence="forward_kl")
    st = logits((V, N)).t()  # unit stride along rows only: gets copied
    check(backend, st, t, divergence="tvd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    s = torch.zeros(0, 11, requires_grad=True)
    t = torch.zeros(0, 11)
    loss = fd.distill_loss(s, t, backend=backend)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert s.grad.shape == (0, 11)
    assert fd.distill_loss(s, t, reduction="none", backend=backend).shape == (0,)


def test_backends_agree_bitwise_with_themselves_across_calls_of_different_batch_sizes():
    """A row's result does not depend on the other rows in the batch (no cross-row state)."""
    s, t = logits((9, 300)), logits((9, 300))
    for backend in BACKENDS:
        if small(backend):
            continue
        full = fd.distill_loss(s, t, reduction="none", backend=backend)
        part = fd.distill_loss(s[3:5], t[3:5], reduction="none", backend=backend)
        assert torch.equal(full[3:5], part)
