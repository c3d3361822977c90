"""A ``transformers.Trainer`` that distils a teacher into the student with fastdistill's fused
losses.

    from fastdistill.integrations.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  distill_config=fd.DistillConfig(temperature=2.0, hard_weight=0.5),
                                  train_dataset=..., data_collator=...)
    trainer.train()

Each step runs both models to their last hidden states (the lm_head is applied to zero tokens,
so no ``[tokens, vocab]`` logits exist) and computes :func:`fastdistill.linear_distill_loss`
with both lm_heads, plus ``feature_weight`` times a :class:`fastdistill.FeatureDistillLoss`
when ``distill_config.layer_map`` is set. See :class:`DistillationTrainer`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastdistill.integrations.hf needs transformers (pip install "
                      "transformers); the rest of fastdistill does not") from e

from fastdistill.config import DistillConfig
from fastdistill.feature_distill import FeatureDistillLoss
from fastdistill.integrations._common import (HeadCapture, at_least_one, causal_targets,
                                              fold_logit_scales, head_terms, logit_transform,
                                              output_head, student_ce_and_entropy, text_config,
                                              unwrap)
from fastdistill.linear import linear_distill_loss

__all__ = ["DistillationTrainer", "loss_kwargs", "run_to_hidden"]

FEATURE_STATE = "fastdistill_feature_loss.pt"

# options of DistillConfig that are not keywords of linear_distill_loss (the trainer uses them
# itself, or they do not apply to a teacher given as a model)
_NOT_LOSS_KW = {"layer_map", "feature_kind", "feature_weight", "topk_tail", "shift_labels",
                "reduction"}
_DEFAULTS = DistillConfig()


def loss_kwargs(cfg: DistillConfig, student_scale=None, teacher_scale=None,
                student_cap=None, teacher_cap=None) -> dict:
    """Keywords of :func:`fastdistill.linear_distill_loss` for a config. The model-derived logit
    scale and softcap fill the options the config leaves at None. Options at their defaults are
    left out, so only the keywords in use are passed."""
    kw = {}
    for name in DistillConfig.option_names():
        if name in _NOT_LOSS_KW:
            continue
        v = getattr(cfg, name)
        if name in ("divergence", "temperature", "hard_weight", "soft_weight", "ignore_index",
                    "beta") or v != getattr(_DEFAULTS, name):
            kw[name] = v
    if cfg.divergence != "symmetric_kl":
        kw.pop("ratio", None)
    for name, v in (("student_logit_scale", student_scale), ("teacher_logit_scale", teacher_scale),
                    ("student_softcap", student_cap), ("teacher_softcap", teacher_cap)):
        if kw.get(name) is None and v is not None:
            kw[name] = v
    return kw


def run_to_hidden(model: nn.Module, **inputs):
    """Run a Hugging Face causal LM to its last hidden state without computing its logits.

    Returns ``(hidden, weight, bias, outputs)`` such that ``hidden @ weight.T + bias`` are the
    logits the model's lm_head would produce (PEFT LoRA / modules_to_save heads resolved, the
    operands cast as autocast would cast them), ready for
    :func:`fastdistill.linear_distill_loss`; ``outputs`` is the model's output (its logits
    have zero positions). ``model`` may be wrapped (DDP, accelerate): the forward runs through
    the wrapper, so gradients synchronise as usual. Under ``torch.no_grad`` for a teacher."""
    head = output_head(model)
    with HeadCapture(head) as cap:
        outputs = model(**inputs)
    h, w, b = head_terms(head, cap.get(type(unwrap(model)).__name__), cap.autocast_dtype)
    return h, w, b, outputs


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss distils ``teacher_model`` into the trained model.

    Args:
        model: the student, a Hugging Face causal LM (or a PEFT model of one; LoRA on the
            lm_head included).
        teacher_model: a causal LM over the same vocabulary (``distill_config.vocab_size`` when
            the lm_head widths differ, e.g. padded vocabularies). Any dtype; it is frozen,
            kept in eval mode and run under ``torch.no_grad``, and placed on the training
            device (not wrapped in DDP).
        distill_config: a :class:`fastdistill.DistillConfig` (default: forward KL at T=1,
            soft weight 1). ``reduction`` must be ``"mean"``. Its ``layer_map``,
            ``feature_kind`` and ``feature_weight`` add ``feature_weight *``
            :class:`fastdistill.FeatureDistillLoss` over the models' hidden states (learned
            projections between different widths are optimised with the student).
        log_loss_parts: log ``soft_loss``, ``hard_loss`` and ``feature_loss`` (the weighted
            contributions, summing to ``loss``) beside ``loss``. When both ``soft_weight`` and
            ``hard_weight`` are non-zero this costs one extra no-grad pass of the student's
            lm_head per step (chunked; it never holds the full logits).
        every other argument: as for ``transformers.Trainer`` (``compute_loss_func`` is not
            accepted: the loss is this trainer's).

    Per micro-batch: targets are the labels shifted by one (``labels[:, 1:]``, the causal LM
    convention, whatever ``distill_config.shift_labels`` says: the trainer aligns them itself;
    a collator's ``shift_labels`` are used as given; without labels, the next ``input_ids``
    with padding ignored). The soft loss counts the same tokens as the hard loss.
    The loss is ``linear_distill_loss(...)`` summed over the counted tokens and divided by
    Trainer's ``num_items_in_batch`` (the token count of the whole gradient-accumulation batch,
    across processes), so gradient accumulation and DDP give the loss of the full batch; without
    ``num_items_in_batch`` it is the mean over the micro-batch and Trainer divides by the
    accumulation steps. The feature term is a mean over the micro-batch's attended tokens,
    averaged over accumulation steps and processes.

    Logit scales / softcaps the models apply after their lm_head (``logit_scale``,
    ``logits_scaling``, ``final_logit_softcapping`` in their configs) are applied in the loss
    unless the config sets them. Mixed precision: the lm_head operands are cast as autocast
    would cast them; the logits are float32 inside the loss.
    """

    def __init__(self, model=None, teacher_model=None, args=None, *,
                 distill_config: Optional[DistillConfig] = None, log_loss_parts: bool = True,
                 **kwargs):
        if teacher_model is None:
            raise ValueError("teacher_model is required (the model to distil from)")
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module (a Hugging Face causal LM), "
                            f"got {type(teacher_model).__name__}")
        if distill_config is None:
            distill_config = DistillConfig()
        if not isinstance(distill_config, DistillConfig):
            raise TypeError(f"distill_config must be a fastdistill.DistillConfig, got "
                            f"{type(distill_config).__name__}")
        if distill_config.reduction != "mean":
            raise ValueError(f"distill_config.reduction must be 'mean' in a trainer (tokens are "
                             f"averaged over the batch), got {distill_config.reduction!r}")
        if distill_config.ignore_index != -100:
            raise ValueError(f"distill_config.ignore_index must be -100 in the trainer (the label "
                             f"value Trainer's token count ignores), got "
                             f"{distill_config.ignore_index}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func is not accepted: DistillationTrainer computes "
                             "the distillation loss itself")
        if not isinstance(log_loss_parts, bool):
            raise TypeError(f"log_loss_parts must be a bool, got {type(log_loss_parts).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("DistillationTrainer does not support nn.DataParallel (several GPUs "
                             "in one process); launch with accelerate launch or torchrun")
        # compute_loss consumes num_items_in_batch: Trainer counts the label tokens of each
        # accumulation batch and treats the returned loss as already scaled for accumulation
        self.model_accepts_loss_kwargs = True
        # and the loss shifts the labels, so that count is over labels[..., 1:]
        self._loss_shifts_labels = True
        self.distill_config = distill_config
        self.log_loss_parts = log_loss_parts

        student = unwrap(self.model)
        output_head(student, "model")
        output_head(teacher_model, "teacher_model")
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

        self._s_scale, self._s_cap = logit_transform(student)
        self._t_scale, self._t_cap = logit_transform(teacher_model)
        self._loss_kw = loss_kwargs(distill_config, self._s_scale, self._t_scale, self._s_cap,
                                    self._t_cap)
        vs = _head_width(output_head(student))
        vt = _head_width(output_head(teacher_model))
        if vs != vt and distill_config.vocab_size is None:
            raise ValueError(f"the student's lm_head has {vs} outputs and the teacher's {vt}; set "
                             "distill_config.vocab_size to the shared (real) vocabulary size")

        self.feature_loss = None
        cfg = distill_config
        if cfg.layer_map is not None and cfg.feature_weight > 0:
            s_cfg, t_cfg = text_config(student), text_config(teacher_model)
            for who, c, n in (("student", s_cfg, cfg.layer_map.num_student_layers),
                              ("teacher", t_cfg, cfg.layer_map.num_teacher_layers)):
                if c.num_hidden_layers != n:
                    raise ValueError(f"distill_config.layer_map is for {n} {who} layers but the "
                                     f"{who} has {c.num_hidden_layers}")
            self.feature_loss = FeatureDistillLoss(cfg.layer_map, s_cfg.hidden_size,
                                                   t_cfg.hidden_size, kind=cfg.feature_kind,
                                                   backend=cfg.backend)
            self.feature_loss.to(self.args.device)
        self._parts = {}
        self._parts_step = 0

    # ---- optimizer, checkpoints ----------------------------------------------------------------

    def _feature_params(self):
        if self.feature_loss is None:
            return []
        return [p for p in self.feature_loss.parameters() if p.requires_grad]

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        params = self._feature_params()
        if params:
            have = {id(p) for g in opt.param_groups for p in g["params"]}
            new = [p for p in params if id(p) not in have]
            if new:
                opt.add_param_group({"params": new, "weight_decay": 0.0})
        return opt

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.feature_loss is not None and self.args.should_save:
            out = output_dir if output_dir is not None else self.args.output_dir
            torch.save(self.feature_loss.state_dict(), os.path.join(out, FEATURE_STATE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, FEATURE_STATE)
        if self.feature_loss is not None and os.path.isfile(path):
            self.feature_loss.load_state_dict(torch.load(path, map_location=self.args.device))

    # ---- the loss ----------------------------------------------------------------------------

    def _run(self, model, head, inputs, want_hidden):
        with HeadCapture(head) as cap:
            out = model(**inputs, use_cache=False, output_hidden_states=want_hidden)
        return cap, out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill_config
        num_items_in_batch = at_least_one(num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shifted = inputs.pop("shift_labels", None)
        want_hidden = self.feature_loss is not None
        student = unwrap(self.accelerator.unwrap_model(model))
        teacher = unwrap(self.teacher_model)
        s_head, t_head = output_head(student), output_head(teacher)

        s_cap, s_out = self._run(model, s_head, inputs, want_hidden)
        teacher.eval()
        with torch.no_grad():
            t_cap, t_out = self._run(self.teacher_model, t_head, inputs, want_hidden)

        if shifted is not None:
            targets = shifted
        else:
            targets = causal_targets(labels, inputs.get("input_ids"),
                                     inputs.get("attention_mask"), cfg.ignore_index)
        h_s, w_s, b_s = head_terms(s_head, s_cap.get("student"), s_cap.autocast_dtype)
        with torch.no_grad():
            h_t, w_t, b_t = head_terms(t_head, t_cap.get("teacher"), t_cap.autocast_dtype)
        h_t = h_t.to(w_t.device)
        h_s = h_s.to(w_s.device)
        targets = targets.to(h_s.device)
        # outside autocast: the operands already carry autocast's dtypes and the loss keeps
        # its logits in float32
        kw = dict(self._loss_kw)
        with torch.autocast(h_s.device.type, enabled=False):
            h_s, b_s, h_t, b_t = fold_logit_scales(kw, h_s, b_s, h_t, b_t)
            kd = linear_distill_loss(h_s, w_s, h_t, w_t, targets, student_bias=b_s,
                                     teacher_bias=b_t, num_items_in_batch=num_items_in_batch,
                                     reduction="mean", **kw)

        scaled = num_items_in_batch is not None
        # the token count spans every process while DDP averages gradients: undo the average
        world = self.accelerator.num_processes if (
            scaled and self.args.average_tokens_across_devices) else 1
        if world != 1:
            kd = kd * world
        ga = getattr(self, "current_gradient_accumulation_steps",
                     self.args.gradient_accumulation_steps)
        loss = kd
        feat = None
        if self.feature_loss is not None:
            mask = inputs.get("attention_mask")
            feat = self.feature_loss(s_out.hidden_states, t_out.hidden_states, mask)
            feat = feat * cfg.feature_weight
            if scaled:
                feat = feat / ga
            loss = loss + feat

        if self.log_loss_parts and self.model.training:
            self._record_parts(kd, feat, h_s, w_s, b_s, targets, num_items_in_batch, world,
                               1 if scaled else ga)
        if return_outputs:
            return loss, {"loss": loss}
        return loss

    @torch.no_grad()
    def _record_parts(self, kd, feat, h_s, w_s, b_s, targets, n_items, world, div):
        cfg = self.distill_config
        kd = kd.detach().float()
        if cfg.hard_weight == 0:
            soft, hard = kd, torch.zeros_like(kd)
        elif cfg.soft_weight == 0:
            soft, hard = torch.zeros_like(kd), kd
        else:
            ce, _ = student_ce_and_entropy(
                h_s.detach(), w_s.detach(), b_s.detach() if b_s is not None else None, targets,
                ignore_index=cfg.ignore_index, softcap=self._loss_kw.get("student_softcap"),
                vocab_size=cfg.vocab_size)  # h_s carries the logit scale already
            if n_items is not None:
                denom = torch.as_tensor(n_items, dtype=torch.float32, device=ce.device)
            else:
                denom = (targets != cfg.ignore_index).sum().clamp_min(1).float()
            hard = cfg.hard_weight * ce / denom * world
            soft = kd - hard
        vals = {"soft_loss": soft / div, "hard_loss": hard / div}
        if feat is not None:
            vals["feature_loss"] = feat.detach().float() / div
        for k, v in vals.items():
            self._parts[k] = self._parts.get(k, 0) + v

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        params = self._feature_params()
        # the feature projections live outside the DDP-wrapped model: average their gradients
        if params and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.accelerator.num_processes
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts:
            steps = max(1, self.state.global_step - self._parts_step)
            for k, v in self._parts.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=self.args.device)
                if self.accelerator.num_processes > 1:
                    v = self.accelerator.gather(v.reshape(1)).mean()
                logs[k] = round(float(v) / steps, 6)
            self._parts = {}
            self._parts_step = self.state.global_step
        super().log(logs, start_time)


def _head_width(head: nn.Module) -> int:
    from fastdistill.integrations._common import _is_lora, _is_modules_to_save
    while _is_modules_to_save(head):
        head = head.original_module
    if _is_lora(head):
        head = head.base_layer
    w = getattr(head, "weight", None)
    if w is None or w.dim() != 2:
        raise TypeError(f"unsupported lm_head type {type(head).__name__} (nn.Linear expected)")
    return w.shape[0]
