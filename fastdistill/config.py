"""DistillConfig: every option of the distillation losses, validated once.

The functions (``distill_loss``, ``linear_distill_loss``) build one from their keyword
arguments; the modules (``DistillLoss``, ``LinearDistillLoss``) and the trainer integrations
build one at construction, so a bad option fails there, not at the first step.

``KernelOptions`` is what the backends see: the divergence code and the numbers a kernel
multiplies by, derived from a config.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from fastdistill.divergences import DIVERGENCES, kernel_code

REDUCTIONS = ("mean", "sum", "none", "batchmean")
MODES = ("auto", "chunked", "fused")
TOPK_TAILS = ("bucket", "none", "renormalize")
FEATURE_KINDS = ("mse", "cosine", "normalized_mse")
BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def real(name: str, value, *, lo=None, hi=None, lo_open=False, what="") -> float:
    """A finite real number in [lo, hi] (or (lo, hi] with lo_open); TypeError / ValueError
    naming the argument otherwise."""
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


def positive_or_none(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number or None, got {type(value).__name__}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be a positive finite number or None, got {value}")
    return float(value)


def positive_int_or_none(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return int(value)


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class KernelOptions:
    """The per-call numbers of a logit-level kernel (identical for every row).

    With z_s, z_t the student and teacher logits of a row:
      a = s_mul * z_s, b = t_mul * z_t     (the divergence's logits: scale / T)
      CE on h_mul * z_s                    (the hard loss: the scaled student at T = 1)
      row loss = soft_scale * D(softmax(b), softmax(a)) + hard_weight * CE
    ``beta`` is jsd's / skew's beta, or symmetric_kl's ratio.
    """

    divergence: int
    beta: float
    s_mul: float
    t_mul: float
    h_mul: float
    soft_scale: float
    hard_weight: float
    ignore_index: int

    @property
    def same_lse(self) -> bool:
        """The hard loss can reuse the divergence's student log-sum-exp (a == h_mul z_s)."""
        return self.s_mul == self.h_mul


@dataclass(frozen=True)
class DistillConfig:
    """Options of ``distill_loss`` / ``linear_distill_loss`` and of the trainers.

    Loss: ``divergence`` (one of ``fastdistill.DIVERGENCES``), ``beta`` (jsd / skew_*, in
    [0, 1]), ``ratio`` (symmetric_kl, in [0, 1]), ``temperature`` (> 0), ``t2_scale``,
    ``hard_weight``, ``soft_weight`` (>= 0), ``ignore_index``, ``reduction`` (``mean``,
    ``sum``, ``none``, ``batchmean``), ``vocab_size``, ``student_logit_scale`` /
    ``teacher_logit_scale`` (z * scale first, then softcap, then 1 / T),
    ``student_softcap`` / ``teacher_softcap`` (c tanh(z / c); the linear loss, and precomputed
    teacher logits there), ``shift_labels`` (causal LMs: logits[..., :-1, :] against
    labels[..., 1:]), ``topk_tail`` (sparse teachers).

    Execution: ``backend``, ``mode`` (linear: ``auto``, ``chunked`` or ``fused``),
    ``chunk_size`` (linear: rows per chunk), ``vocab_chunk_size`` (linear, fused: vocabulary
    columns per backward chunk).

    Feature distillation (trainers): ``layer_map`` (a ``fastdistill.LayerMap``),
    ``feature_kind`` and ``feature_weight``.
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    ratio: float = 0.5
    temperature: float = 1.0
    t2_scale: bool = False
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    vocab_size: Optional[int] = None
    student_logit_scale: Optional[float] = None
    teacher_logit_scale: Optional[float] = None
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    shift_labels: bool = False
    topk_tail: str = "bucket"
    backend: str = "auto"
    mode: str = "auto"
    chunk_size: Optional[int] = None
    vocab_chunk_size: Optional[int] = None
    layer_map: Any = None
    feature_kind: str = "mse"
    feature_weight: float = 0.0

    def __post_init__(self):
        if not isinstance(self.divergence, str):
            raise TypeError(f"divergence must be a str, one of {DIVERGENCES}, "
                            f"got {type(self.divergence).__name__}")
        choice("divergence", self.divergence, DIVERGENCES)
        s = object.__setattr__
        s(self, "beta", real("beta", self.beta, lo=0.0, hi=1.0,
                             what=" (beta is a mixing weight in [0, 1])"))
        s(self, "ratio", real("ratio", self.ratio, lo=0.0, hi=1.0,
                              what=" (ratio weighs KL(P||Q) against KL(Q||P))"))
        s(self, "temperature", real("temperature", self.temperature, lo=0.0, lo_open=True))
        flag("t2_scale", self.t2_scale)
        s(self, "hard_weight", real("hard_weight", self.hard_weight, lo=0.0))
        s(self, "soft_weight", real("soft_weight", self.soft_weight, lo=0.0))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index,
                                                                 numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        s(self, "ignore_index", int(self.ignore_index))
        choice("reduction", self.reduction, REDUCTIONS)
        if self.vocab_size is not None:
            if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size,
                                                                   numbers.Integral):
                raise TypeError(f"vocab_size must be an int, got "
                                f"{type(self.vocab_size).__name__}")
            if self.vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1 (the number of real vocabulary "
                                 f"columns), got {self.vocab_size}")
            s(self, "vocab_size", int(self.vocab_size))
        for name in ("student_logit_scale", "teacher_logit_scale", "student_softcap",
                     "teacher_softcap"):
            s(self, name, positive_or_none(name, getattr(self, name)))
        flag("shift_labels", self.shift_labels)
        choice("topk_tail", self.topk_tail, TOPK_TAILS)
        choice("backend", self.backend, BACKENDS)
        choice("mode", self.mode, MODES)
        s(self, "chunk_size", positive_int_or_none("chunk_size", self.chunk_size))
        s(self, "vocab_chunk_size", positive_int_or_none("vocab_chunk_size",
                                                         self.vocab_chunk_size))
        if self.layer_map is not None:
            from fastdistill.layers import LayerMap
            if not isinstance(self.layer_map, LayerMap):
                raise TypeError(f"layer_map must be a fastdistill.LayerMap or None, got "
                                f"{type(self.layer_map).__name__}")
        choice("feature_kind", self.feature_kind, FEATURE_KINDS)
        s(self, "feature_weight", real("feature_weight", self.feature_weight, lo=0.0))

    def replace(self, **changes) -> "DistillConfig":
        """A copy with some options changed (validated again)."""
        return replace(self, **changes)

    @classmethod
    def option_names(cls):
        return tuple(f.name for f in fields(cls))

    @property
    def soft_scale(self) -> float:
        """Weight of the divergence term: soft_weight * (T^2 if t2_scale else 1)."""
        return self.soft_weight * (self.temperature ** 2 if self.t2_scale else 1.0)

    def kernel_options(self, fold_logit_scales: bool = True) -> KernelOptions:
        """The kernels' numbers. ``fold_logit_scales=False`` when the caller has already
        multiplied the logits by their scales (the linear loss does, before a softcap)."""
        ss = (self.student_logit_scale or 1.0) if fold_logit_scales else 1.0
        ts = (self.teacher_logit_scale or 1.0) if fold_logit_scales else 1.0
        inv_t = 1.0 / self.temperature
        return KernelOptions(divergence=kernel_code(self.divergence, self.beta, self.ratio),
                             beta=self.ratio if self.divergence == "symmetric_kl" else self.beta,
                             s_mul=ss * inv_t, t_mul=ts * inv_t, h_mul=ss,
                             soft_scale=self.soft_scale, hard_weight=self.hard_weight,
                             ignore_index=self.ignore_index)
