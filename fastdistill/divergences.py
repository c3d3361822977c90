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


# The float64 references used to live here; they are re-exported for existing imports.
from fastdistill.reference import (  # noqa: E402,F401
    reference_cross_entropy, reference_distill_loss, reference_divergence, reference_reduce)
