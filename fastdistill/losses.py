"""nn.Module wrappers around the functional losses: options at construction (validated there,
into a DistillConfig), tensors at call."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from fastdistill.config import DistillConfig
from fastdistill.functional import distill_loss_with
from fastdistill.linear import linear_distill_loss_with

_DEFAULTS = {f.name: f.default for f in fields(DistillConfig)}


def _config(config, options: dict) -> DistillConfig:
    """The module's DistillConfig: ``config`` as given, or built from the keyword options (only
    one of the two may set options)."""
    changed = {k: v for k, v in options.items() if v is not _DEFAULTS[k] and v != _DEFAULTS[k]}
    if config is None:
        return DistillConfig(**options)
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a fastdistill.DistillConfig, got {type(config).__name__}")
    if changed:
        raise TypeError(f"pass the options either in config= or as keywords, not both (got "
                        f"config and {sorted(changed)})")
    return config


def _unknown(cls: str, unknown: dict, names) -> None:
    if unknown:
        raise TypeError(f"{cls} got unknown option(s) {sorted(unknown)}; expected some of "
                        f"{list(names)} (or config=DistillConfig(...))")


def _repr(cfg: DistillConfig, names) -> str:
    return ", ".join(f"{k}={getattr(cfg, k)!r}" for k in names
                     if getattr(cfg, k) != _DEFAULTS[k])


class DistillLoss(nn.Module):
    """``DistillLoss(**options)(student_logits, teacher_logits, labels=None, *, mask=None,
    num_items_in_batch=None, teacher_topk=None)``: :func:`fastdistill.distill_loss` with its
    options fixed at construction (or given as ``config=DistillConfig(...)``)."""

    _NAMES = ("divergence", "beta", "ratio", "temperature", "t2_scale", "hard_weight",
              "soft_weight", "ignore_index", "reduction", "vocab_size", "student_logit_scale",
              "teacher_logit_scale", "shift_labels", "topk_tail", "backend")

    def __init__(self, divergence="forward_kl", beta=0.5, ratio=0.5, temperature=1.0,
                 t2_scale=False, hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                 reduction="mean", vocab_size=None, student_logit_scale=None,
                 teacher_logit_scale=None, shift_labels=False, backend="auto", topk_tail="bucket",
                 *, config=None, **unknown):
        super().__init__()
        _unknown(type(self).__name__, unknown, self._NAMES)
        opts = dict(divergence=divergence, beta=beta, ratio=ratio, temperature=temperature,
                    t2_scale=t2_scale, hard_weight=hard_weight, soft_weight=soft_weight,
                    ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                    student_logit_scale=student_logit_scale,
                    teacher_logit_scale=teacher_logit_scale, shift_labels=shift_labels,
                    backend=backend, topk_tail=topk_tail)
        self.config = _config(config, opts)
        if self.config.student_softcap is not None or self.config.teacher_softcap is not None:
            raise ValueError("student_softcap / teacher_softcap apply to LinearDistillLoss")

    def forward(self, student_logits: torch.Tensor, teacher_logits=None, labels=None,
                *, mask=None, num_items_in_batch=None, teacher_topk=None) -> torch.Tensor:
        return distill_loss_with(self.config, student_logits, teacher_logits, labels, mask=mask,
                                 num_items_in_batch=num_items_in_batch, teacher_topk=teacher_topk)

    def extra_repr(self) -> str:
        return _repr(self.config, self._NAMES)


class LinearDistillLoss(nn.Module):
    """``LinearDistillLoss(**options)(student_hidden, student_weight, teacher_hidden=None,
    teacher_weight=None, labels=None, *, teacher_logits=None, student_bias=None,
    teacher_bias=None, mask=None, num_items_in_batch=None)``:
    :func:`fastdistill.linear_distill_loss` with its options fixed at construction (or given
    as ``config=DistillConfig(...)``)."""

    _NAMES = DistillLoss._NAMES + ("student_softcap", "teacher_softcap", "chunk_size",
                                   "vocab_chunk_size", "mode")

    def __init__(self, divergence="forward_kl", beta=0.5, ratio=0.5, temperature=1.0,
                 t2_scale=False, hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                 reduction="mean", vocab_size=None, student_logit_scale=None,
                 teacher_logit_scale=None, shift_labels=False, backend="auto",
                 student_softcap=None, teacher_softcap=None, chunk_size=None,
                 vocab_chunk_size=None, mode="auto", topk_tail="bucket", *, config=None,
                 **unknown):
        super().__init__()
        _unknown(type(self).__name__, unknown, self._NAMES)
        opts = dict(divergence=divergence, beta=beta, ratio=ratio, temperature=temperature,
                    t2_scale=t2_scale, hard_weight=hard_weight, soft_weight=soft_weight,
                    ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                    student_logit_scale=student_logit_scale,
                    teacher_logit_scale=teacher_logit_scale, shift_labels=shift_labels,
                    backend=backend, student_softcap=student_softcap,
                    teacher_softcap=teacher_softcap, chunk_size=chunk_size,
                    vocab_chunk_size=vocab_chunk_size, mode=mode, topk_tail=topk_tail)
        self.config = _config(config, opts)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                labels=None, *, teacher_logits=None, student_bias=None, teacher_bias=None,
                mask=None, num_items_in_batch=None, teacher_topk=None) -> torch.Tensor:
        return linear_distill_loss_with(self.config, student_hidden, student_weight,
                                        teacher_hidden, teacher_weight, labels,
                                        teacher_logits=teacher_logits,
                                        student_bias=student_bias, teacher_bias=teacher_bias,
                                        mask=mask, num_items_in_batch=num_items_in_batch,
                                        teacher_topk=teacher_topk)

    def extra_repr(self) -> str:
        return _repr(self.config, self._NAMES)
