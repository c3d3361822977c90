"""The float64 oracle itself, checked against independent numpy formulas and known identities,
so that agreeing with it means something."""

import math

import numpy as np
import pytest
import torch

from fastdistill.divergences import (reference_cross_entropy, reference_distill_loss,
                                     reference_divergence)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 23)) * 2, rng.normal(size=(4, 23)) * 2


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_against_numpy(pair, beta, T):
    s, t = pair
    q, p = np_softmax(s / T), np_softmax(t / T)
    expected = {
        "forward_kl": np_kl(p, q),
        "reverse_kl": np_kl(q, p),
        "jsd": beta * np_kl(p, beta * p + (1 - beta) * q)
        + (1 - beta) * np_kl(q, beta * p + (1 - beta) * q),
        "skew_forward_kl": np_kl(p, beta * p + (1 - beta) * q),
        "skew_reverse_kl": np_kl(q, (1 - beta) * p + beta * q),
        "tvd": 0.5 * np.abs(p - q).sum(-1),
    }
    for name, want in expected.items():
        got = reference_divergence(torch.tensor(s), torch.tensor(t), name, beta, T).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=name)


def test_beta_endpoints_follow_trl_convention(pair):
    s, t = (torch.tensor(x) for x in pair)
    fkl = reference_divergence(s, t, "forward_kl")
    rkl = reference_divergence(s, t, "reverse_kl")
    assert torch.allclose(reference_divergence(s, t, "jsd", 0.0), fkl)
    assert torch.allclose(reference_divergence(s, t, "jsd", 1.0), rkl)
    assert torch.allclose(reference_divergence(s, t, "skew_forward_kl", 0.0), fkl)
    assert torch.allclose(reference_divergence(s, t, "skew_reverse_kl", 0.0), rkl)
    # full skew is the divergence of a distribution from itself
    assert reference_divergence(s, t, "skew_forward_kl", 1.0).abs().max() < 1e-12
    # symmetric JSD at beta = 1/2, bounded by log 2
    j = reference_divergence(s, t, "jsd", 0.5)
    assert torch.allclose(j, reference_divergence(t, s, "jsd", 0.5))
    assert torch.all(j <= math.log(2))


def test_cross_entropy_and_reduction(pair):
    s = torch.tensor(pair[0])
    labels = torch.tensor([3, -100, 0, 22])
    ce = reference_cross_entropy(s, labels)
    want = torch.nn.functional.cross_entropy(s, labels, reduction="none")
    assert torch.allclose(ce, want)
    t = torch.tensor(pair[1])
    loss = reference_distill_loss(s, t, labels, hard_weight=0.5, soft_weight=2.0,
                                  temperature=2.0, t2_scale=True)
    rows = 2.0 * 4.0 * reference_divergence(s, t, temperature=2.0) + 0.5 * want
    assert torch.allclose(loss, rows[labels != -100].mean())
    assert torch.allclose(reference_distill_loss(s, t, labels, reduction="sum"),
                          reference_divergence(s, t)[labels != -100].sum())
    assert reference_distill_loss(s, t, torch.full((4,), -100)) == 0


def test_masked_entries_have_finite_gradients():
    s = torch.randn(3, 9, dtype=torch.float64)
    t = torch.randn(3, 9, dtype=torch.float64)
    s[:, :3] = -math.inf
    t[:, :3] = -math.inf
    for name in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        x = s.clone().requires_grad_()
        reference_divergence(x, t, name, 0.3).sum().backward()
        assert torch.isfinite(x.grad).all(), name
        assert torch.all(x.grad[:, :3] == 0), name
