"""float64 references of every loss, in plain differentiable PyTorch: the tests' oracle.

They share no code with the kernels or the backends. With P = softmax(b), Q = softmax(a) per
token, a = student_logit_scale * z_s / T and b = teacher_logit_scale * z_t / T:

==================  ===================================================================
``forward_kl``      KL(P || Q)
``reverse_kl``      KL(Q || P)
``symmetric_kl``    ratio KL(P || Q) + (1 - ratio) KL(Q || P)  (torchtune's sym_kd_ratio)
``jsd``             beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q;
                    beta = 0 is forward_kl and beta = 1 is reverse_kl exactly (the
                    convention of TRL's ``generalized_jsd_loss``)
``skew_forward_kl`` KL(P || beta P + (1 - beta) Q)  (DistiLLM, Ko et al. 2024; beta is the skew)
``skew_reverse_kl`` KL(Q || (1 - beta) P + beta Q)
``tvd``             1/2 sum |P - Q|
==================  ===================================================================

token loss = soft_weight * (T^2 if t2_scale else 1) * divergence
             + hard_weight * CE(student_logit_scale * z_s at T = 1, label)

Special values follow from the formulas: 0 log 0 = 0, so -inf logits are exact; a divergence
is +inf where P has mass outside Q's support (or Q outside P's for reverse KL); a row whose
student or teacher logits are all -inf has no distribution and gives NaN, as torch's softmax
does; NaN anywhere in a row gives NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.nn import functional as F

# ---- divergences ----------------------------------------------------------------------------


def _plogr(w: torch.Tensor, lw: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (lw_j - lm_j) over the support of w: its finite log-weights lw_j (0 log 0 = 0
    elsewhere), +inf where lm_j = -inf there; safe under autograd. The support is defined by
    finiteness, not by whether w_j underflows (also in float64, below e^-745). NaN
    propagates."""
    keep = (lw > -math.inf) | torch.isnan(lw)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    d = torch.where(keep, lw, zero) - torch.where(keep, lm, zero)
    term = torch.where(keep, w * d, zero)  # +inf where lm = -inf and w > 0, gradient -w
    return torch.where(keep & (lm == -math.inf) & (w == 0), math.inf, term).sum(-1)


def _log_mix(la: torch.Tensor, wa: float, lb: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa e^la + wb e^lb) for weights in [0, 1], in the log domain (no underflow); -inf
    where both are -inf, with a gradient that stays finite there."""
    terms = [(x, math.log(w)) for x, w in ((la, wa), (lb, wb)) if w > 0]
    live = torch.zeros_like(la, dtype=torch.bool)
    for x, _ in terms:
        live = live | (x > -math.inf) | torch.isnan(x)
    zero = torch.zeros((), dtype=la.dtype, device=la.device)
    safe = [torch.where(live, x, zero) + c for x, c in terms]
    out = torch.logsumexp(torch.stack(safe), dim=0) if len(safe) == 2 else safe[0]
    return torch.where(live, out, torch.full_like(out, -math.inf))


def divergence_rows(a: torch.Tensor, b: torch.Tensor, divergence: str = "forward_kl",
                    beta: float = 0.5, ratio: float = 0.5) -> torch.Tensor:
    """Per-row divergence of already scaled float64 logits (a: student, b: teacher): ``[N]``.
    A row without both distributions (a NaN, a +inf, or only -inf logits on a side) gives NaN,
    even where the formula would not see that side (e.g. the student of skew_forward_kl at
    beta = 1)."""
    rows = divergence_from_logprobs(torch.log_softmax(b, -1), torch.log_softmax(a, -1),
                                    divergence, beta, ratio)
    with torch.no_grad():
        nan_row = ~(torch.isfinite(torch.logsumexp(a, -1)) &
                    torch.isfinite(torch.logsumexp(b, -1)))
    return torch.where(nan_row, torch.full_like(rows, math.nan), rows)


def divergence_from_logprobs(lp: torch.Tensor, lq: torch.Tensor, divergence: str = "forward_kl",
                             beta: float = 0.5, ratio: float = 0.5) -> torch.Tensor:
    """The divergence's per-element formula summed over the last dimension, for teacher and
    student log-probabilities ``lp``, ``lq`` ``[N, B]`` (float64). The bins need not sum to 1
    (the top-k losses apply the same formulas to K or K + 1 bins)."""
    q, p = lq.exp(), lp.exp()
    if divergence == "jsd" and beta == 0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return _plogr(p, lp, lq)
    if divergence == "reverse_kl":
        return _plogr(q, lq, lp)
    if divergence == "symmetric_kl":
        out = 0.0
        if ratio > 0:
            out = out + ratio * _plogr(p, lp, lq)
        if ratio < 1:
            out = out + (1 - ratio) * _plogr(q, lq, lp)
        return out
    if divergence == "jsd":
        lm = _log_mix(lp, beta, lq, 1 - beta)
        return beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
    if divergence == "skew_forward_kl":
        return _plogr(p, lp, _log_mix(lp, beta, lq, 1 - beta))
    if divergence == "skew_reverse_kl":
        return _plogr(q, lq, _log_mix(lp, 1 - beta, lq, beta))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def reference_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         divergence: str = "forward_kl", beta: float = 0.5,
                         temperature: float = 1.0, ratio: float = 0.5) -> torch.Tensor:
    """Per-row divergence in float64. Logits ``[N, V]`` (cast to float64); returns ``[N]``."""
    a = student_logits.to(torch.float64) / temperature
    b = teacher_logits.to(torch.float64) / temperature
    return divergence_rows(a, b, divergence, beta, ratio)


def reference_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """Per-row CE(student_logits at T = 1, label) in float64, 0 at ignored rows. ``[N]``."""
    ls = torch.log_softmax(student_logits.to(torch.float64), -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = -ls.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, ce, torch.zeros_like(ce))


# ---- reductions -----------------------------------------------------------------------------


def reference_reduce(rows: torch.Tensor, valid: Optional[torch.Tensor], reduction: str,
                     num_items_in_batch=None, batch_size: Optional[int] = None) -> torch.Tensor:
    """Reduction of per-row losses (rows already 0 where they do not count).

    ``mean``: sum / num_items_in_batch, else / max(#valid rows, 1) (every row when ``valid`` is
    None). ``batchmean`` (TRL's): sum / #valid rows with labels or a mask, else sum /
    ``batch_size`` (the input's first dimension). ``sum``; ``none``: the rows."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean" and valid is None:
        return total / batch_size
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, dtype=torch.float64)
    n = rows.numel() if valid is None else int(valid.sum())
    return total / max(n, 1)


def _shift(x: Optional[torch.Tensor], logits: bool) -> Optional[torch.Tensor]:
    """logits[..., :-1, :] / labels or mask[..., 1:] along the sequence (last leading) dim."""
    if x is None:
        return None
    return x[..., :-1, :] if logits else x[..., 1:]


def _valid_rows(labels, mask, ignore_index):
    valid = None
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
    if mask is not None:
        m = mask.reshape(-1)
        valid = m if valid is None else valid & m
    return valid


# ---- the losses -----------------------------------------------------------------------------


def reference_distill_loss(student_logits, teacher_logits, labels=None, *,
                           divergence="forward_kl", beta=0.5, ratio=0.5, temperature=1.0,
                           t2_scale=False, hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                           reduction="mean", num_items_in_batch=None, vocab_size=None,
                           mask=None, student_logit_scale=None, teacher_logit_scale=None,
                           shift_labels=False) -> torch.Tensor:
    """``distill_loss`` in float64 with plain PyTorch (differentiable). Leading dims are kept
    for reduction="none"."""
    batch = student_logits.shape[0]
    if shift_labels:
        student_logits, teacher_logits = _shift(student_logits, True), _shift(teacher_logits, True)
        labels, mask = _shift(labels, False), _shift(mask, False)
    lead = student_logits.shape[:-1]
    V = vocab_size if vocab_size is not None else student_logits.shape[-1]
    zs = student_logits.reshape(-1, student_logits.shape[-1])[:, :V].to(torch.float64)
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :V].to(torch.float64)
    if student_logit_scale is not None:
        zs = zs * student_logit_scale
    if teacher_logit_scale is not None:
        zt = zt * teacher_logit_scale
    valid = _valid_rows(labels, mask, ignore_index)
    if valid is not None:  # rows that do not count: whatever they hold, 0 and no gradient
        zs = torch.where(valid[:, None], zs, torch.zeros_like(zs))
        zt = torch.where(valid[:, None], zt, torch.zeros_like(zt))
    rows = divergence_rows(zs / temperature, zt / temperature, divergence, beta, ratio)
    rows = rows * (soft_weight * (temperature ** 2 if t2_scale else 1.0))
    lab = labels.reshape(-1) if labels is not None else None
    if hard_weight != 0:
        rows = rows + hard_weight * reference_cross_entropy(zs, lab, ignore_index)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    out = reference_reduce(rows, valid, reduction, num_items_in_batch, batch)
    return out.reshape(lead) if reduction == "none" else out


def reference_logits(hidden, weight, bias=None, softcap=None, logit_scale=None):
    """float64 ``softcap(scale * (hidden @ weight.T + bias))``: the logits of the linear loss."""
    z = hidden.to(torch.float64) @ weight.to(torch.float64).t()
    if bias is not None:
        z = z + bias.to(torch.float64)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference_linear_distill_loss(student_hidden, student_weight, teacher_hidden=None,
                                  teacher_weight=None, labels=None, *, teacher_logits=None,
                                  student_bias=None, teacher_bias=None, student_softcap=None,
                                  teacher_softcap=None, student_logit_scale=None,
                                  teacher_logit_scale=None, **kw) -> torch.Tensor:
    """``linear_distill_loss`` in float64: the logits made explicitly, then
    :func:`reference_distill_loss` (every other keyword is passed on)."""
    zs = reference_logits(student_hidden, student_weight, student_bias, student_softcap,
                          student_logit_scale)
    if teacher_logits is not None:
        zt = teacher_logits.to(torch.float64)
        if teacher_logit_scale is not None:
            zt = zt * teacher_logit_scale
        if teacher_softcap is not None:
            zt = teacher_softcap * torch.tanh(zt / teacher_softcap)
    else:
        zt = reference_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
                              teacher_logit_scale)
    return reference_distill_loss(zs, zt, labels, **kw)


def reference_feature_loss(student, teacher, kind="mse", mask=None, projection=None,
                           reduction="mean") -> torch.Tensor:
    """``feature_loss`` in float64 with plain PyTorch (differentiable).

    Per token: ``mse`` mean_j (s_j - t_j)^2; ``cosine`` 1 - s.t / (max(|s|, 1e-8) max(|t|,
    1e-8)); ``normalized_mse`` the mse of F.layer_norm(s), F.layer_norm(t) (eps 1e-5, no
    affine terms). ``projection`` ([Dt, Ds] weight or nn.Linear) maps the student first."""
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    if projection is not None:
        w, b = (projection.weight, projection.bias) if isinstance(projection, torch.nn.Linear) \
            else (projection, None)
        s = s @ w.to(torch.float64).t()
        if b is not None:
            s = s + b.to(torch.float64)
    if mask is not None:  # rows that do not count: whatever they hold, 0 and no gradient
        s = torch.where(mask[..., None], s, torch.zeros_like(s))
        t = torch.where(mask[..., None], t, torch.zeros_like(t))
    if kind == "mse":
        rows = ((s - t) ** 2).mean(-1)
    elif kind == "cosine":
        ns = s.norm(dim=-1).clamp_min(1e-8)
        nt = t.norm(dim=-1).clamp_min(1e-8)
        rows = 1 - (s * t).sum(-1) / (ns * nt)
    elif kind == "normalized_mse":
        D = s.shape[-1]
        rows = ((F.layer_norm(s, (D,), eps=1e-5) - F.layer_norm(t, (D,), eps=1e-5)) ** 2).mean(-1)
    else:
        raise ValueError(f"unknown feature kind {kind!r}")
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if mask is None else int(mask.sum())
    return rows.sum() / max(n, 1)


# ---- sparse (top-k) teachers ----------------------------------------------------------------
#
# The teacher is given as ``indices [..., K]`` (distinct vocabulary entries of each row) and
# ``logprobs [..., K]``: the teacher's log-probabilities at the loss's temperature, used as given
# (P_k = exp(logprobs_k)). The student is a = student_logit_scale * z / T over the V columns,
# Q = softmax(a), q_k = Q at indices_k, and Q_out = sum of Q outside the indices (computed as
# exp(LSE_{j not in I} a_j - LSE a), never as 1 - sum q_k). Per token, with D the divergence's
# per-element formula summed over bins b (fastdistill.reference.divergence_from_logprobs):
#
#   topk_tail="bucket"       K + 1 bins: (P_1..P_K, P_out), (q_1..q_K, Q_out), with
#                            P_out = max(0, 1 - sum_k P_k); a proper distribution on both
#                            sides (TRL's loss_add_tail=True). With K = V nothing lies outside
#                            the indices: there is no tail bin and the loss is the dense one.
#   topk_tail="none"         the K support bins only: sum_k D(P_k, q_k), q from the full
#                            softmax over V (DistillKit's / MaxText's sparse KL).
#   topk_tail="renormalize"  both restricted to the indices and renormalised:
#                            P^_k = P_k / sum P, Q^_k = q_k / sum q (softmax of a at the
#                            indices); only the K student logits matter.
#
# Gradient w.r.t. a_j (times student_logit_scale / T for the logit), with qh_b = q_b dD/dq_b
# the exact partial derivative of the bin's term times the bin's student probability, and
# aux = sum_b qh_b over the bins:
#   bucket:       j = indices_k:  qh_k - aux q_j;   j outside:  qh_out (q_j / Q_out) - aux q_j
#   none:         j = indices_k:  qh_k - aux q_j;   j outside:  - aux q_j
#   renormalize:  j = indices_k:  qh_k - aux Q^_k (with Q^ in qh);   j outside: 0
# where qh is, per divergence: forward_kl -p; reverse_kl q (log q - log p + 1);
# jsd (1 - beta) q (log q - log m), m = beta p + (1 - beta) q; skew_forward_kl
# -(1 - beta) q p / m, m = beta p + (1 - beta) q; skew_reverse_kl q (log q - log m + 1 - beta q / m),
# m = (1 - beta) p + beta q; tvd q sign(q - p) / 2; symmetric_kl the ratio-weighted sum.
#
# Special values, the rules of csrc/include/fastdistill/divergence.h applied to the bins: a
# logprob of -inf is a teacher probability of 0 at that index (its terms p log p vanish; reverse
# KL is +inf when the student has mass there, and then the gradient is NaN); a -inf student
# logit at an index is q_k = 0 there (forward KL +inf where P_k > 0, with its finite gradient);
# P mass summing above 1 by rounding gives P_out = 0; a NaN or +inf logprob, or a row without a
# student distribution (for renormalize: at the indices), gives a NaN loss and gradient.
# Repeated or out-of-range indices in a row that counts are an error (the kernels: NaN loss
# and zero gradient for that row).


def _masked_logsumexp(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of x where ``drop`` is False; -inf (with a zero gradient)
    when nothing finite remains."""
    x = torch.where(drop, torch.full_like(x, -math.inf), x)
    mx = x.amax(-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.exp(x - mx).sum(-1, keepdim=True)
    pos = s > 0
    out = torch.log(torch.where(pos, s, torch.ones_like(s))) + mx
    return torch.where(pos, out, torch.full_like(out, -math.inf)).squeeze(-1)


def topk_bins(a: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
              tail: str = "bucket"):
    """(teacher, student) log-probabilities of the bins of each row, float64 ``[N, K]`` or
    ``[N, K + 1]`` (bucket, K < V), from scaled student logits ``a [N, V]``."""
    idx = indices.to(torch.int64)
    lp = logprobs.to(torch.float64)
    if tail == "renormalize":
        return lp - torch.logsumexp(lp, -1, keepdim=True), torch.log_softmax(a.gather(-1, idx), -1)
    lsm = torch.log_softmax(a, -1)
    lq = lsm.gather(-1, idx)
    if tail == "none" or idx.shape[-1] >= a.shape[-1]:
        return lp, lq
    if tail != "bucket":
        raise ValueError(f"unknown topk_tail {tail!r}")
    member = torch.zeros_like(a, dtype=torch.bool).scatter(-1, idx, True)
    lq_out = _masked_logsumexp(lsm, member)
    p_out = (1.0 - lp.exp().sum(-1)).clamp_min(0.0)
    return torch.cat([lp, torch.log(p_out).unsqueeze(-1)], -1), torch.cat([lq, lq_out[:, None]], -1)


def reference_topk_distill_loss(student_logits, indices, logprobs, labels=None, *,
                                topk_tail="bucket", divergence="forward_kl", beta=0.5,
                                ratio=0.5, temperature=1.0, t2_scale=False, hard_weight=0.0,
                                soft_weight=1.0, ignore_index=-100, reduction="mean",
                                num_items_in_batch=None, vocab_size=None, mask=None,
                                student_logit_scale=None, shift_labels=False) -> torch.Tensor:
    """``distill_loss(student_logits, None, labels, teacher_topk=(indices, logprobs), ...)`` in
    float64 with plain PyTorch (differentiable w.r.t. the student): the formulas above."""
    batch = student_logits.shape[0]
    if shift_labels:
        student_logits = _shift(student_logits, True)
        indices, logprobs = _shift(indices, True), _shift(logprobs, True)
        labels, mask = _shift(labels, False), _shift(mask, False)
    lead = student_logits.shape[:-1]
    V = vocab_size if vocab_size is not None else student_logits.shape[-1]
    zs = student_logits.reshape(-1, student_logits.shape[-1])[:, :V].to(torch.float64)
    if student_logit_scale is not None:
        zs = zs * student_logit_scale
    idx = indices.reshape(-1, indices.shape[-1]).to(torch.int64)
    lp = logprobs.reshape(-1, logprobs.shape[-1]).to(torch.float64)
    valid = _valid_rows(labels, mask, ignore_index)
    if valid is not None:  # rows that do not count may hold anything: give them a harmless row
        idx = torch.where(valid[:, None], idx, torch.arange(idx.shape[1]).clamp_max(V - 1))
        lp = torch.where(valid[:, None], lp, torch.full_like(lp, math.log(0.5 / lp.shape[1])))
    bad = (idx < 0) | (idx >= V)
    if bool(bad.any()) or bool((idx.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("indices must be distinct and in [0, vocab) in every row that counts")
    lp_b, lq_b = topk_bins(zs / temperature, idx, lp, topk_tail)
    rows = divergence_from_logprobs(lp_b, lq_b, divergence, beta, ratio)
    # a NaN or +inf logprob: no teacher distribution
    broken = torch.isnan(lp).any(-1) | (lp == math.inf).any(-1)
    rows = torch.where(broken, torch.full_like(rows, math.nan), rows)
    rows = rows * (soft_weight * (temperature ** 2 if t2_scale else 1.0))
    lab = labels.reshape(-1) if labels is not None else None
    if hard_weight != 0:
        rows = rows + hard_weight * reference_cross_entropy(zs, lab, ignore_index)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    out = reference_reduce(rows, valid, reduction, num_items_in_batch, batch)
    return out.reshape(lead) if reduction == "none" else out
