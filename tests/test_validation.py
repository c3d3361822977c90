"""Bad input gets a ValueError or TypeError that names the argument and what was expected."""

import pytest
import torch

import fastdistill as fd

S = torch.randn(4, 10)
T = torch.randn(4, 10)
L = torch.randint(0, 10, (4,))


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(divergence=3), TypeError, "divergence must be a str"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(beta=1.5), ValueError, "beta must be <= 1"),
    (dict(beta="0.5"), TypeError, "beta must be a real number"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=None), TypeError, "temperature must be a real number"),
    (dict(t2_scale=1), TypeError, "t2_scale must be a bool"),
    (dict(hard_weight=-1.0), ValueError, "hard_weight must be >= 0"),
    (dict(soft_weight=-0.5), ValueError, "soft_weight must be >= 0"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(vocab_size=11), ValueError, r"vocab_size must be in \[1, 10\]"),
    (dict(vocab_size=0), ValueError, r"vocab_size must be in \[1, 10\]"),
    (dict(vocab_size=5.0), TypeError, "vocab_size must be an int"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
    (dict(num_items_in_batch=torch.tensor(-2.0)), ValueError, "num_items_in_batch must be > 0"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "one-element tensor"),
    (dict(num_items_in_batch="3"), TypeError, "num_items_in_batch must be a number"),
    (dict(num_items_in_batch=3, reduction="sum"), ValueError, "only applies to reduction='mean'"),
])
def test_bad_options(kw, exc, match):
    raises(exc, match, fd.distill_loss, S, T, L, **kw)


def test_bad_tensors():
    raises(TypeError, "student_logits must be a torch.Tensor", fd.distill_loss, [1.0], T)
    raises(TypeError, "teacher_logits must be a torch.Tensor", fd.distill_loss, S, None)
    raises(TypeError, "student_logits must be float32, float16 or bfloat16", fd.distill_loss,
           S.to(torch.int64), T)
    raises(TypeError, "teacher_logits must be float32, float16 or bfloat16", fd.distill_loss,
           S, T.double())
    raises(ValueError, "student_logits must have at least 1 dimension", fd.distill_loss,
           torch.tensor(1.0), T)
    raises(ValueError, "teacher_logits has leading shape", fd.distill_loss, S, T[:3])
    raises(ValueError, "pass vocab_size", fd.distill_loss, S, torch.randn(4, 12))
    raises(ValueError, "at least one vocabulary column", fd.distill_loss, S[:, :0], T[:, :0])


def test_bad_labels():
    raises(TypeError, "labels must be an integer tensor", fd.distill_loss, S, T, L.float())
    raises(TypeError, "labels must be a torch.Tensor", fd.distill_loss, S, T, [1, 2, 3, 4])
    raises(ValueError, "labels must have the logits' leading shape", fd.distill_loss, S, T, L[:2])
    raises(ValueError, "hard_weight > 0 needs labels", fd.distill_loss, S, T, hard_weight=1.0)
    bad = L.clone()
    bad[2] = 10
    raises(ValueError, r"labels must be in \[0, 10\)", fd.distill_loss, S, T, bad,
           hard_weight=1.0)
    bad[2] = -5
    raises(ValueError, r"labels must be in \[0, 10\)", fd.distill_loss, S, T, bad,
           hard_weight=1.0)
    # with a padded vocabulary the real range is [0, vocab_size)
    bad[2] = 8
    raises(ValueError, r"labels must be in \[0, 8\)", fd.distill_loss, S, T, bad,
           hard_weight=1.0, vocab_size=8)


def test_label_equal_to_ignore_index_is_fine_even_out_of_range():
    lab = L.clone()
    lab[0] = -1
    loss = fd.distill_loss(S, T, lab, hard_weight=1.0, ignore_index=-1)
    assert torch.isfinite(loss)


def test_devices_must_match():
    meta = torch.randn(4, 10, device="meta")
    raises(ValueError, "teacher_logits is on meta but student_logits is on cpu", fd.distill_loss,
           S, meta)


def test_unavailable_backend_says_why():
    with pytest.raises(fd.BackendUnavailableError, match="backend='cuda' is unavailable"):
        fd.distill_loss(S, T, backend="cuda")


def test_module_rejects_unknown_and_bad_options_at_construction():
    raises(TypeError, "unknown option", fd.DistillLoss, temprature=2.0)
    raises(ValueError, "temperature must be > 0", fd.DistillLoss, temperature=0)
    raises(ValueError, "divergence must be one of", fd.DistillLoss, divergence="kl")
    raises(ValueError, "backend must be one of", fd.DistillLoss, backend="gpu")
    raises(ValueError, "backend must be one of", fd.LinearDistillLoss, backend="gpu")
    # every option is validated once, when the module (its DistillConfig) is built
    raises(ValueError, "mode must be one of", fd.LinearDistillLoss, mode="x")
    raises(ValueError, "chunk_size must be a positive int", fd.LinearDistillLoss, chunk_size=0)
    raises(ValueError, "student_softcap must be a positive", fd.LinearDistillLoss,
           student_softcap=-1.0)
    raises(ValueError, "vocab_size must be >= 1", fd.DistillLoss, vocab_size=-1)
    raises(TypeError, "config must be a fastdistill.DistillConfig", fd.DistillLoss, config={})
    raises(TypeError, "either in config= or as keywords", fd.DistillLoss,
           temperature=2.0, config=fd.DistillConfig())
    raises(ValueError, "ratio must be <= 1", fd.DistillConfig, ratio=1.5)
    raises(ValueError, "reduction must be one of", fd.DistillConfig, reduction="avg")


def test_num_items_in_batch_must_be_finite():
    raises(ValueError, "num_items_in_batch must be > 0 and finite", fd.distill_loss, S, T, L,
           num_items_in_batch=float("inf"))
    raises(ValueError, "num_items_in_batch must be > 0 and finite", fd.distill_loss, S, T, L,
           num_items_in_batch=torch.tensor(float("inf")))
    raises(ValueError, "num_items_in_batch must be > 0 and finite", fd.distill_loss, S, T, L,
           num_items_in_batch=float("nan"))


def test_teacher_with_grad_and_student_without_fails_at_forward():
    t = T.clone().requires_grad_()
    raises(ValueError, "teacher_logits requires grad but student_logits does not",
           fd.distill_loss, S, t)
    with torch.no_grad():  # evaluation: fine
        assert torch.isfinite(fd.distill_loss(S, t))
    h, w = torch.randn(4, 6), torch.randn(10, 6)
    raises(ValueError, "teacher_weight requires grad but the student", fd.linear_distill_loss,
           h, w, h, w.clone().requires_grad_())
    raises(ValueError, "teacher requires grad but student does not", fd.feature_loss,
           h, h.clone().requires_grad_())


@pytest.mark.parametrize("mode,backend", [("chunked", "cpu"), ("fused", "triton")])
def test_second_backward_through_a_linear_loss_raises(mode, backend):
    """The gradients were computed in the forward and consumed by the first backward: a second
    one through the same graph raises rather than returning them scaled twice."""
    from util import cpu_backends
    if backend not in cpu_backends():
        pytest.skip(f"the {backend} backend is not available here")
    h = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(10, 6, requires_grad=True)
    loss = fd.linear_distill_loss(h, w, torch.randn(4, 6), torch.randn(10, 6), mode=mode,
                                  backend=backend) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
