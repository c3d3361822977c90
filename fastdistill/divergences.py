"""Divergence names, their kernel codes and parameters.

With P = softmax(teacher / T) and Q = softmax(student / T) per token (the formulas, and their
float64 references, are in :mod:`fastdistill.reference`):

==================  ===================================================================
``forward_kl``      KL(P || Q)
``reverse_kl``      KL(Q || P)
``jsd``             beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
``skew_forward_kl`` KL(P || beta P + (1 - beta) Q)
``skew_reverse_kl`` KL(Q || (1 - beta) P + beta Q)
``tvd``             1/2 sum |P - Q|
``symmetric_kl``    ratio KL(P || Q) + (1 - ratio) KL(Q || P)
==================  ===================================================================
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Kernel codes: csrc/include/fastdistill/divergence.h and fastdistill/kernels/ use the same
# numbers (the order of this tuple).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "symmetric_kl")
DIVERGENCE_CODES = {name: i for i, name in enumerate(DIVERGENCES)}
FKL, RKL, JSD, SFKL, SRKL, TVD, SKL = range(len(DIVERGENCES))


def kernel_code(divergence: str, beta: float, ratio: float) -> int:
    """The divergence the kernels compute, with the parameter endpoints mapped exactly: jsd at
    beta 0 / 1 is forward / reverse KL, skew_* at beta 0 is forward / reverse KL, symmetric_kl
    at ratio 1 / 0 is forward / reverse KL. The kernels never see a mixture weight of 0 that
    would divide by an empty mixture."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    elif divergence == "skew_forward_kl" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "skew_reverse_kl" and beta == 0.0:
        divergence = "reverse_kl"
    elif divergence == "symmetric_kl" and ratio in (0.0, 1.0):
        divergence = "forward_kl" if ratio == 1.0 else "reverse_kl"
    return DIVERGENCE_CODES[divergence]


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
        raise TypeError(f"divergence must be a str, one of {DIVERGENCES[:6]}, "
                        f"got {type(divergence).__name__}")
    if divergence not in DIVERGENCES[:6]:
        raise ValueError(f"divergence must be one of {DIVERGENCES[:6]}, got {divergence!r}")
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



# The float64 references used to live here; they are re-exported for existing imports.
from fastdistill.reference import (  # noqa: E402,F401
    reference_cross_entropy, reference_distill_loss, reference_divergence, reference_reduce)
