"""nn.Module wrappers around the functional losses: options at construction, tensors at call."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastdistill.divergences import make_options
from fastdistill.functional import distill_loss


def _check_backend_name(options):
    from fastdistill.backends import BACKENDS
    b = options.get("backend", "auto")
    if not isinstance(b, str) or b not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {b!r}")


class DistillLoss(nn.Module):
    """``DistillLoss(**options)(student_logits, teacher_logits, labels=None)``.

    ``options`` are the keyword arguments of :func:`fastdistill.distill_loss` (divergence,
    beta, temperature, t2_scale, hard_weight, soft_weight, ignore_index, reduction,
    vocab_size, backend); ``num_items_in_batch`` may also be given per call.
    """

    _OPTIONS = tuple(p for p in inspect.signature(distill_loss).parameters
                     if p not in ("student_logits", "teacher_logits", "labels",
                                  "num_items_in_batch"))

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(self._OPTIONS))
        if unknown:
            raise TypeError(f"DistillLoss got unknown option(s) {unknown}; expected some of "
                            f"{list(self._OPTIONS)}")
        # validate now so a bad option fails at construction, not at the first step
        make_options(**{k: v for k, v in options.items()
                        if k not in ("vocab_size", "backend")})
        _check_backend_name(options)
        self.options = dict(options)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels=None, *, num_items_in_batch=None) -> torch.Tensor:
        return distill_loss(student_logits, teacher_logits, labels,
                            num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearDistillLoss(nn.Module):
    """``LinearDistillLoss(**options)(student_hidden, student_weight, teacher_hidden,
    teacher_weight, labels=None)``.

    ``options`` are the keyword arguments of :func:`fastdistill.linear_distill_loss` that are
    not tensors (divergence, beta, temperature, t2_scale, hard_weight, soft_weight,
    ignore_index, reduction, vocab_size, backend, student_softcap, teacher_softcap,
    chunk_size, mode). Biases, precomputed ``teacher_logits`` and ``num_items_in_batch`` are
    given per call.
    """

    _TENSORS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels",
                "teacher_logits", "student_bias", "teacher_bias", "num_items_in_batch")

    def __init__(self, **options):
        super().__init__()
        from fastdistill.linear import linear_distill_loss
        allowed = [p for p in inspect.signature(linear_distill_loss).parameters
                   if p not in self._TENSORS]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"LinearDistillLoss got unknown option(s) {unknown}; expected some "
                            f"of {allowed}")
        make_options(**{k: v for k, v in options.items() if k in DistillLoss._OPTIONS
                        and k not in ("vocab_size", "backend")})
        _check_backend_name(options)
        self.options = dict(options)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                labels=None, *, teacher_logits=None, student_bias=None, teacher_bias=None,
                num_items_in_batch=None) -> torch.Tensor:
        from fastdistill.linear import linear_distill_loss
        return linear_distill_loss(student_hidden, student_weight, teacher_hidden,
                                   teacher_weight, labels, teacher_logits=teacher_logits,
                                   student_bias=student_bias, teacher_bias=teacher_bias,
                                   num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
