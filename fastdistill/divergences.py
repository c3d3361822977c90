"""Divergence names, their parameters and validation, and float64 reference formulas.

With P = softmax(teacher_logits / T) and Q = softmax(student_logits / T) per token:

==================  ===================================================================
``forward_kl``      KL(P || Q)
``reverse_kl``      KL(Q || P)
``jsd``             beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q;
                    beta = 0 is forward_kl and beta = 1 is reverse_kl exactly (the
                    convention of TRL's ``generalized_jsd_loss``)
``skew_forward_kl`` KL(P || beta P + (1 - beta) Q)  (DistiLLM, Ko et al. 2024; beta is the skew)
``skew_reverse_kl`` KL(Q || (1 - beta) P + beta Q)
``tvd``             1/2 sum |P - Q|
==================  ===================================================================

token loss = soft_weight * (T^2 if t2_scale else 1) * divergence
             + hard_weight * CE(student_logits at T = 1, label)

The ``reference_*`` functions compute all of this in float64 with plain PyTorch ops and are
differentiable with autograd; the tests compare every backend against them. They share no code
with the kernels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Kernel codes; csrc/include/fastdistill/divergence.h and fastdistill/kernels/ use the same numbers.
DIVERGENCE_CODES = {name: i for i, name in enumerate(DIVERGENCES)}
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class DistillOptions:
    """Validated options of a distillation loss (everything but the tensors)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    t2_scale: bool = False
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"

    @property
    def soft_scale(self) -> float:
        """Weight of the divergence term: soft_weight * (T^2 if t2_scale else 1)."""
        return self.soft_weight * (self.temperature ** 2 if self.t2_scale else 1.0)

    @property
    def kernel_code(self) -> int:
        """The divergence the kernels compute, with the beta endpoints mapped exactly:
        jsd at beta 0 / 1 is forward / reverse KL; skew_* at beta 0 is forward / reverse KL."""
        name = self.divergence
        if name == "jsd" and self.beta == 0.0:
            name = "forward_kl"
        elif name == "jsd" and self.beta == 1.0:
            name = "reverse_kl"
        elif name == "skew_forward_kl" and self.beta == 0.0:
            name = "forward_kl"
        elif name == "skew_reverse_kl" and self.beta == 0.0:
            name = "reverse_kl"
        return DIVERGENCE_CODES[name]


def _real(name: str, value, *, lo=None, hi=None, lo_open=False, what="") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}{what}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}{what}, got {v}")
    return v


def make_options(divergence="forward_kl", beta=0.5, temperature=1.0, t2_scale=False,
                 hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                 reduction="mean") -> DistillOptions:
    """Validates the options of ``distill_loss``; raises ValueError / TypeError naming the
    argument and what was expected."""
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a str, one of {DIVERGENCES}, "
                        f"got {type(divergence).__name__}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = _real("beta", beta, lo=0.0, hi=1.0, what=" (beta is a mixing weight in [0, 1])")
    temperature = _real("temperature", temperature, lo=0.0, lo_open=True)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    hard_weight = _real("hard_weight", hard_weight, lo=0.0)
    soft_weight = _real("soft_weight", soft_weight, lo=0.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return DistillOptions(divergence, beta, temperature, t2_scale, hard_weight, soft_weight,
                          int(ignore_index), reduction)


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------

def _plogr(w: torch.Tensor, lw: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (lw_j - lm_j) with 0 where w_j = 0; safe under autograd (no 0 * inf)."""
    keep = w > 0
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    d = torch.where(keep, lw, zero) - torch.where(keep, lm, zero)
    return (w * d).sum(-1)


def _log_mix(la: torch.Tensor, wa: float, lb: torch.Tensor, wb: float) -> torch.Tensor:
    """log(wa e^la + wb e^lb) for weights in [0, 1]; -inf where both are -inf, with a
    gradient that stays finite there (masked vocabulary entries)."""
    terms = []
    if wa > 0:
        terms.append((la, math.log(wa)))
    if wb > 0:
        terms.append((lb, math.log(wb)))
    live = torch.zeros_like(la, dtype=torch.bool)
    for x, _ in terms:
        live = live | (x > -math.inf)
    zero = torch.zeros((), dtype=la.dtype, device=la.device)
    safe = [torch.where(live, x, zero) + c for x, c in terms]
    out = torch.logsumexp(torch.stack(safe), dim=0) if len(safe) == 2 else safe[0]
    return torch.where(live, out, torch.full_like(out, -math.inf))


def reference_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         divergence: str = "forward_kl", beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence in float64. Logits ``[N, V]`` (cast to float64); returns ``[N]``."""
    s = student_logits.to(torch.float64) / temperature
    t = teacher_logits.to(torch.float64) / temperature
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    if divergence == "forward_kl" or (divergence in ("jsd", "skew_forward_kl") and beta == 0):
        return _plogr(p, lp, lq)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1) or \
            (divergence == "skew_reverse_kl" and beta == 0):
        return _plogr(q, lq, lp)
    if divergence == "jsd":
        lm = _log_mix(lp, beta, lq, 1 - beta)
        return beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
    if divergence == "skew_forward_kl":
        return _plogr(p, lp, _log_mix(lp, beta, lq, 1 - beta))
    if divergence == "skew_reverse_kl":
        return _plogr(q, lq, _log_mix(lp, 1 - beta, lq, beta))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def reference_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """Per-row CE(student_logits at T = 1, label) in float64, 0 at ignored rows. ``[N]``."""
    ls = torch.log_softmax(student_logits.to(torch.float64), -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    ce = -ls.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, ce, torch.zeros_like(ce))


def reference_reduce(rows: torch.Tensor, valid: Optional[torch.Tensor], reduction: str,
                     num_items_in_batch=None) -> torch.Tensor:
    """Reduction of per-row losses as in distill_loss (rows already 0 where ignored)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, dtype=torch.float64)
    n = rows.numel() if valid is None else int(valid.sum())
    return total / max(n, 1)


def reference_distill_loss(student_logits, teacher_logits, labels=None, *,
                           divergence="forward_kl", beta=0.5, temperature=1.0, t2_scale=False,
                           hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                           reduction="mean", num_items_in_batch=None,
                           vocab_size=None) -> torch.Tensor:
    """``distill_loss`` in float64 with plain PyTorch (differentiable). Leading dims are kept
    for reduction="none"."""
    lead = student_logits.shape[:-1]
    V = vocab_size if vocab_size is not None else student_logits.shape[-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])[:, :V].to(torch.float64)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :V].to(torch.float64)
    rows = reference_divergence(s, t, divergence, beta, temperature)
    rows = rows * (soft_weight * (temperature ** 2 if t2_scale else 1.0))
    valid = None
    if labels is not None:
        lab = labels.reshape(-1)
        valid = lab != ignore_index
        if hard_weight != 0:
            rows = rows + hard_weight * reference_cross_entropy(s, lab, ignore_index)
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    out = reference_reduce(rows, valid, reduction, num_items_in_batch)
    return out.reshape(lead) if reduction == "none" else out
