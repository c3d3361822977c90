"""Drop-in subclasses of TRL's distillation trainers whose loss takes fastdistill's fused path.

    from fastdistill.integrations.trl import DistillationTrainer   # instead of trl's
    from fastdistill.integrations.trl import GKDTrainer, GOLDTrainer

Everything but the loss step is TRL's own (generation, data handling, logging, arguments).
The loss is :func:`fastdistill.linear_distill_loss` on the models' last hidden states and
lm_head weights, with TRL's divergence (``beta``: 0 forward KL, 1 reverse KL, in between the
generalized JSD with the same mixture), temperature, token mask, reduction
(``num_items_in_batch``, else the mean over counted tokens) and the logit scales / softcaps the
models' configs declare. The values equal TRL's within float32 rounding.

* ``DistillationTrainer`` (``trl.DistillationTrainer``): replaces TRL's own chunked loss (two
  ``[4096, 32768]`` float32 tiles and a float32 ``[V, D]`` weight-gradient buffer) by the fused
  one. The per-token student entropy TRL logs costs one extra no-grad pass over the student's
  lm_head here; set ``log_entropy = False`` on the trainer to skip it (the metric is then
  left out).
* ``GKDTrainer`` / ``GOLDTrainer`` (``trl.experimental``): TRL computes both models' full
  ``[B, T, V]`` logits and the generalized JSD on them; here the logits are never made. GOLD's
  cross-tokenizer ULD loss (``use_uld_loss`` with a teacher tokenizer) is not a logit
  divergence over a shared vocabulary: that configuration runs TRL's own loss unchanged.
"""

from __future__ import annotations

import torch

try:
    import trl as _trl
    from trl import DistillationTrainer as _TRLDistillationTrainer
except ImportError as e:
    raise ImportError("fastdistill.integrations.trl needs TRL: pip install trl (tested with "
                      "trl 1.16). The rest of fastdistill does not need it.") from e

from fastdistill.integrations._common import (HeadCapture, at_least_one, causal_targets,
                                              divergence_for_beta, fold_logit_scales,
                                              head_terms, logit_transform, output_head,
                                              student_ce_and_entropy, unwrap)
from fastdistill.linear import linear_distill_loss

__all__ = ["DistillationTrainer", "GKDTrainer", "GOLDTrainer", "fused_jsd_loss"]


def _scale_kw(student, teacher) -> dict:
    s_scale, s_cap = logit_transform(student)
    t_scale, t_cap = logit_transform(teacher)
    kw = {}
    for k, v in (("student_logit_scale", s_scale), ("teacher_logit_scale", t_scale),
                 ("student_softcap", s_cap), ("teacher_softcap", t_cap)):
        if v is not None:
            kw[k] = v
    return kw


def fused_jsd_loss(student_hidden, student_head, teacher_hidden, teacher_head, targets=None, *,
                   mask=None, beta, temperature=1.0, num_items_in_batch=None,
                   ignore_index=-100, autocast_dtypes=(None, None), **kw):
    """TRL's generalized JSD (``beta`` 0: forward KL, 1: reverse KL) over the rows that count
    (``targets != ignore_index``, or ``mask`` True), reduced as TRL reduces it (sum /
    num_items_in_batch, else sum / max(#counted rows, 1)), from hidden states and lm_head
    modules."""
    h_s, w_s, b_s = head_terms(student_head, student_hidden, autocast_dtypes[0])
    with torch.no_grad():
        h_t, w_t, b_t = head_terms(teacher_head, teacher_hidden, autocast_dtypes[1])
    with torch.autocast(h_s.device.type, enabled=False):
        h_s, b_s, h_t, b_t = fold_logit_scales(kw, h_s, b_s, h_t, b_t)
        return linear_distill_loss(h_s, w_s, h_t.to(w_t.device), w_t,
                                   targets.to(h_s.device) if targets is not None else None,
                                   mask=mask.to(h_s.device) if mask is not None else None,
                                   student_bias=b_s, teacher_bias=b_t,
                                   temperature=temperature, reduction="mean",
                                   num_items_in_batch=at_least_one(num_items_in_batch),
                                   ignore_index=ignore_index, **divergence_for_beta(beta), **kw)


class DistillationTrainer(_TRLDistillationTrainer):
    """``trl.DistillationTrainer`` with fastdistill's fused loss step (same arguments)."""

    log_entropy = True

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        mm = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask",
                                     "spatial_shapes", "image_sizes", "token_type_ids",
                                     "mm_token_type_ids", "image_position_ids") if k in inputs}
        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep, **mm)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            h_t = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                            self._get_last_hidden_state, unwrapped_teacher,
                                            input_ids, attention_mask, keep, **mm)
        s_head = unwrapped_student.get_output_embeddings()
        t_head = unwrapped_teacher.get_output_embeddings()
        if s_head.weight.device != t_head.weight.device:
            raise ValueError(f"the student lm_head is on {s_head.weight.device} and the teacher's "
                             f"on {t_head.weight.device}; place both on one device")
        device = s_head.weight.device
        valid = loss_mask.to(device) != 0
        kw = _scale_kw(unwrapped_student, unwrapped_teacher)
        loss = fused_jsd_loss(h_s.to(device), s_head, h_t.to(device), t_head, mask=valid,
                              beta=self.beta, temperature=self.temperature,
                              num_items_in_batch=num_items_in_batch, **kw)
        n_valid = valid.sum()
        if self.log_entropy:
            _, entropy_sum = student_ce_and_entropy(
                h_s.detach(), s_head.weight.detach(), s_head.bias, torch.where(valid, 0, -100),
                logit_scale=kw.get("student_logit_scale"), softcap=kw.get("student_softcap"),
                temperature=self.temperature)
        else:
            entropy_sum = torch.full((), float("nan"), device=device)
        return loss, entropy_sum, n_valid


def _logit_free_forward(model, head, kwargs):
    with HeadCapture(head) as cap:
        model(**kwargs)
    return cap


class _CausalKDLossMixin:
    """compute_loss of GKD / GOLD (standard, shared-vocabulary path) on hidden states."""

    def _fused_loss(self, model, inputs, num_items_in_batch, temperature, extra=None):
        extra = extra or {}
        student = unwrap(self.accelerator.unwrap_model(model))
        teacher = unwrap(self.accelerator.unwrap_model(self.teacher_model))
        s_head, t_head = output_head(student), output_head(teacher)
        fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
               **extra}
        s_cap = _logit_free_forward(model, s_head, fwd)
        self.teacher_model.eval()
        with torch.no_grad():
            t_cap = _logit_free_forward(self.teacher_model, t_head, fwd)
        targets = causal_targets(inputs["labels"], None, None, -100)
        return fused_jsd_loss(s_cap.get("student"), s_head, t_cap.get("teacher"), t_head,
                              targets, beta=self.beta, temperature=temperature,
                              num_items_in_batch=num_items_in_batch,
                              autocast_dtypes=(s_cap.autocast_dtype, t_cap.autocast_dtype),
                              **_scale_kw(student, teacher))


def _experimental(module, name):
    import importlib
    try:
        return getattr(importlib.import_module(f"trl.experimental.{module}"), name)
    except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the TRL version
        raise ImportError(f"this TRL ({_trl.__version__}) has no trl.experimental.{module}."
                          f"{name}") from e


_GKD = _experimental("gkd", "GKDTrainer")
_GOLD = _experimental("gold", "GOLDTrainer")


class GKDTrainer(_CausalKDLossMixin, _GKD):
    """``trl.experimental.gkd.GKDTrainer`` with the fused loss (same arguments). As in TRL, the
    divergence runs at temperature 1 (``args.temperature`` is the sampling temperature)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self._fused_loss(model, inputs, num_items_in_batch, 1.0)
        return (loss, {"loss": loss}) if return_outputs else loss


class GOLDTrainer(_CausalKDLossMixin, _GOLD):
    """``trl.experimental.gold.GOLDTrainer`` with the fused loss on its shared-vocabulary path
    (generalized JSD at ``args.temperature``); the cross-tokenizer ULD loss is TRL's."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.use_uld_loss and self.teacher_tokenizer is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra = self._get_model_forward_kwargs(inputs)
        extra.pop("input_ids", None)
        extra.pop("attention_mask", None)
        loss = self._fused_loss(model, inputs, num_items_in_batch, self.temperature, extra)
        return (loss, {"loss": loss}) if return_outputs else loss
