"""Parity with TRL's top-k loss of server distillation, run from the installed TRL on the same
inputs: ``ServerDistillationTrainer._compute_server_forward_kl_loss`` (forward KL over the
teacher's top-k logprobs) with ``loss_add_tail=True`` (a tail bucket: our topk_tail="bucket")
and ``loss_add_tail=False`` (in the installed TRL both sides are renormalised over the top-k:
our "renormalize"), and TRL's ``_add_tail_bucket`` + ``_jsd_divergence`` for its generalised
JSD (beta in (0, 1); beta = 1 is reverse KL) on the same sparse support.

Needs trl (with transformers, accelerate and datasets, which it imports); skipped only when it
cannot be imported."""

import types

import pytest
import torch

import fastdistill as fd

trl_sd = pytest.importorskip("trl.experimental.server_distillation.server_distillation_trainer",
                             reason="trl is not installed")


def _problem(B=3, L=7, V=211, K=16, T=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2.5
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2.5
    lp_t = torch.log_softmax(t / T, -1)
    top = lp_t.topk(K, -1)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = -100  # prompt positions
    labels[2, -1] = -100
    return s, top.indices, top.values, labels


def _trl_forward_kl(s, idx, lps, labels, T, add_tail):
    """TRL's method on a stand-in for the trainer (it reads loss_add_tail and calls the static
    _reduce_divergence_loss)."""
    trainer = types.SimpleNamespace(
        loss_add_tail=add_tail,
        _reduce_divergence_loss=trl_sd.ServerDistillationTrainer._reduce_divergence_loss)
    student_log_probs = torch.log_softmax(s / T, -1)
    return trl_sd.ServerDistillationTrainer._compute_server_forward_kl_loss(
        trainer, {"topk_logprobs": lps, "topk_token_ids": idx}, student_log_probs, labels)


@pytest.mark.parametrize("add_tail,tail", [(True, "bucket"), (False, "renormalize")])
def test_trl_server_forward_kl(add_tail, tail):
    T = 1.5
    s, idx, lps, labels = _problem(T=T)
    x = s.detach().requires_grad_()
    ref = _trl_forward_kl(x, idx, lps, labels, T, add_tail)
    ref.backward()
    y = s.float().requires_grad_()
    ours = fd.distill_loss(y, None, labels, teacher_topk=(idx, lps.float()), topk_tail=tail,
                           temperature=T)
    ours.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_trl_sparse_jsd(beta, tail):
    """TRL's generalised JSD on the top-k support (with its tail bucket, or renormalised), the
    way its server path composes it, against divergence="jsd" with the same beta."""
    T = 1.0
    s, idx, lps, labels = _problem(T=T, seed=1)
    x = s.detach().requires_grad_()
    lq = torch.log_softmax(x / T, -1).gather(-1, idx)
    valid = torch.ones_like(lq, dtype=torch.bool)
    if tail == "bucket":
        lq_b, mask = trl_sd._add_tail_bucket(lq, valid)
        lp_b, _ = trl_sd._add_tail_bucket(lps, valid)
    else:
        lq_b, lp_b, mask = lq - lq.logsumexp(-1, keepdim=True), \
            lps - lps.logsumexp(-1, keepdim=True), valid
    per_elem = trl_sd._jsd_divergence(lq_b, lp_b, beta, mask)
    ref = trl_sd.ServerDistillationTrainer._reduce_divergence_loss(
        per_elem, completion_mask=labels != -100, reduction="batchmean")
    ref.backward()
    y = s.float().requires_grad_()
    ours = fd.distill_loss(y, None, labels, teacher_topk=(idx, lps.float()), topk_tail=tail,
                           divergence="jsd", beta=beta, temperature=T)
    ours.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-4, atol=1e-7)
