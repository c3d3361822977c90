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
    rows = _divergence_rows(a, b, divergence, beta, ratio)
    with torch.no_grad():
        nan_row = ~(torch.isfinite(torch.logsumexp(a, -1)) &
                    torch.isfinite(torch.logsumexp(b, -1)))
    return torch.where(nan_row, torch.full_like(rows, math.nan), rows)


def _divergence_rows(a, b, divergence, beta, ratio):
    lq, lp = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
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
