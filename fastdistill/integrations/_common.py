"""Helpers shared by the trainer integrations (torch only; transformers, TRL and PEFT are
never imported here, their modules are recognised by their attributes).

* :class:`HeadCapture` runs a causal LM to its last hidden state without its logits: while it
  is active the output-embedding module (the lm_head) records its input and is applied to zero
  tokens instead, so the model returns ``[B, 0, V]`` logits. Every head parameter stays in
  the autograd graph of that output, which keeps DDP's unused-parameter search correct.
* :func:`head_terms` turns a captured input and the head module into ``(hidden, weight,
  bias)`` for :func:`fastdistill.linear_distill_loss`, seeing through PEFT wrappers: a LoRA
  head ``W x + s B A drop(x)`` becomes ``[x, s A drop(x)] @ [W, B]^T`` (exact, dropout
  included, gradients reach A and B through autograd, and the only copy is the concatenated
  ``[V, D + r]`` weight); a ``modules_to_save`` head uses its active copy.
* :func:`logit_transform` reads what a model does to its logits after the lm_head (a scale,
  a softcap) from its config, so the loss sees the logits the model would return.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def output_head(model: nn.Module, name: str = "model") -> nn.Module:
    """The lm_head (output embeddings) of a Hugging Face causal LM, PEFT-wrapped or not."""
    model = unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(f"{name} must be a causal language model with an lm_head "
                        f"(get_output_embeddings() returned None for {type(model).__name__})")
    return head


def text_config(model: nn.Module):
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no config; a Hugging Face PreTrainedModel "
                        "is expected")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def logit_transform(model: nn.Module) -> Tuple[Optional[float], Optional[float]]:
    """(logit scale, softcap) a model applies after its lm_head, from its config.

    The scale: ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier``
    (Falcon-H1), ``logits_scaling`` (divides for Granite / MiniCPM3, multiplies for HyperCLOVA
    X). The softcap: ``final_logit_softcapping`` (Gemma 2/3). None where the model has none."""
    cfg = text_config(model)
    scale = None
    for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(cfg, key, None)
        if v is not None:
            scale = float(v)
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        v = float(cfg.logits_scaling)
        scale = v if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / v
    if scale is not None and scale == 1.0:
        scale = None
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap is not None else None)


class HeadCapture:
    """Context manager: while active, ``head`` records its input (``.hidden``) and the autocast
    dtype in force when it ran (``.autocast_dtype``), and computes no logits (it is applied to
    an empty slice of its input)."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.hidden: Optional[torch.Tensor] = None
        self.autocast_dtype: Optional[torch.dtype] = None
        self._saved = None

    def __enter__(self) -> "HeadCapture":
        head = self.head
        own = head.__dict__.get("forward")
        self._saved = (("forward" in head.__dict__), own)
        inner = head.forward

        def forward(x, *args, **kwargs):
            if self.hidden is not None:
                raise RuntimeError("the lm_head ran twice in one forward; fastdistill's trainers "
                                   "need one lm_head call per forward")
            self.hidden = x
            dev = x.device.type
            if torch.is_autocast_enabled(dev):
                self.autocast_dtype = torch.get_autocast_dtype(dev)
            return inner(x[..., :0, :], *args, **kwargs)

        head.forward = forward
        return self

    def __exit__(self, *exc):
        had, own = self._saved
        if had:
            self.head.forward = own
        else:
            del self.head.forward
        return False

    def get(self, name: str) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError(f"the {name}'s forward did not call its lm_head "
                               "(get_output_embeddings()); cannot take its last hidden state")
        return self.hidden


def _is_modules_to_save(m) -> bool:
    return hasattr(m, "modules_to_save") and hasattr(m, "original_module")


def _is_lora(m) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "base_layer")


def head_terms(head: nn.Module, hidden: torch.Tensor,
               autocast_dtype: Optional[torch.dtype] = None):
    """``(hidden, weight, bias)`` with ``hidden @ weight.T + bias`` equal to ``head(hidden)``.

    Plain ``nn.Linear``; PEFT ``modules_to_save`` (its active copy); PEFT LoRA (vanilla LoRA,
    any number of active adapters, merged or not, adapters disabled or not). Under autocast
    (``autocast_dtype``) the operands are cast as autocast casts them for ``F.linear``; the
    logits are still float32 in the loss."""
    while _is_modules_to_save(head):
        active = head.active_adapters
        head = head.original_module if head.disable_adapters or not active \
            else head.modules_to_save[active[0]]
    if _is_lora(head):
        h, w, b = _lora_terms(head, hidden)
    elif isinstance(head, nn.Linear):
        h, w, b = hidden, head.weight, head.bias
    else:
        raise TypeError(f"unsupported lm_head type {type(head).__name__}: fastdistill's trainers "
                        "need an nn.Linear head (optionally PEFT LoRA / modules_to_save)")
    if autocast_dtype is not None:
        h, w = h.to(autocast_dtype), w.to(autocast_dtype)
        b = b.to(autocast_dtype) if b is not None else None
    return h, w, b


def _lora_terms(head, x):
    base = head.base_layer
    if not isinstance(base, nn.Linear):
        raise TypeError(f"unsupported LoRA lm_head base layer {type(base).__name__} "
                        "(nn.Linear expected)")
    W, b = base.weight, base.bias
    if head.disable_adapters or head.merged:
        return x, W, b
    hs, ws, bs = [x], [W], [b] if b is not None else []
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in getattr(head, "lora_variant", {}):
            raise NotImplementedError(f"LoRA variant {type(head.lora_variant[name]).__name__} "
                                      f"(adapter {name!r}) on the lm_head is not supported; "
                                      "plain LoRA is (use_dora=False)")
        A, B = head.lora_A[name], head.lora_B[name]
        s = head.scaling[name]
        xa = head.lora_dropout[name](x.to(A.weight.dtype))
        hs.append(torch.nn.functional.linear(xa, A.weight) * s)  # [..., r]
        ws.append(B.weight)                                        # [V, r]
        if B.bias is not None:  # lora_bias=True: lora_B's bias is scaled with its output
            bs.append(B.bias * s)
    if len(hs) == 1:
        return x, W, b
    dt = W.dtype
    for t in ws[1:]:
        dt = torch.promote_types(dt, t.dtype)
    h = torch.cat([t.to(dt) for t in hs], dim=-1)
    w = torch.cat([t.to(dt) for t in ws], dim=1)
    bias = None
    for t in bs:
        bias = t if bias is None else bias + t
    return h, w, bias


def fold_logit_scales(kw: dict, h_s, b_s, h_t, b_t):
    """Pops ``student_logit_scale`` / ``teacher_logit_scale`` from the loss keywords ``kw`` and
    folds them into the hidden states and biases: ``s (h W^T + b) = (s h) W^T + s b``, the
    logits scaled before any softcap, as the loss defines them."""
    s, t = kw.pop("student_logit_scale", None), kw.pop("teacher_logit_scale", None)
    if s is not None:
        h_s = h_s * s
        b_s = b_s * s if b_s is not None else None
    if t is not None:
        h_t = h_t * t
        b_t = b_t * t if b_t is not None else None
    return h_s, b_s, h_t, b_t


def at_least_one(n):
    """A token count clamped to >= 1 without a host sync (a batch whose labels are all ignored
    then has loss 0, not 0 / 0)."""
    if n is None:
        return None
    if isinstance(n, torch.Tensor):
        return n.clamp(min=1)
    return max(n, 1)


def causal_targets(labels: Optional[torch.Tensor], input_ids: Optional[torch.Tensor],
                   attention_mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Targets aligned with the hidden states of a causal LM: position t predicts token t+1.

    ``labels[..., 1:]`` followed by one ``ignore_index`` column (so the hidden states need no
    slicing or copy); without labels, ``input_ids`` with padding (attention_mask == 0)
    ignored."""
    if labels is None:
        if input_ids is None:
            raise ValueError("the batch needs labels or input_ids")
        labels = input_ids
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, ignore_index)
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


@torch.no_grad()
def student_ce_and_entropy(hidden, weight, bias, targets, *, ignore_index=-100,
                           logit_scale=None, softcap=None, vocab_size=None, temperature=1.0,
                           chunk=None):
    """Sums over the counted rows (targets != ignore_index) of the student's cross-entropy at
    T=1 and of its entropy at ``temperature``, both float32 0-d tensors, computed in row chunks
    (logging only: no gradient; ``chunk`` rows of float32 logits at a time, by default as many
    as fit in 32 MiB)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk is None:
        chunk = max(1, min(1024, (32 << 20) // (4 * weight.shape[0])))
    t = targets.reshape(-1)
    w = weight
    ce = torch.zeros((), dtype=torch.float32, device=h.device)
    ent = torch.zeros((), dtype=torch.float32, device=h.device)
    for r0 in range(0, h.shape[0], chunk):
        r1 = min(h.shape[0], r0 + chunk)
        z = torch.nn.functional.linear(h[r0:r1].to(w.dtype), w).float()
        if bias is not None:
            z = z + bias.float()
        if logit_scale is not None:
            z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        if vocab_size is not None:
            z = z[:, :vocab_size]
        tt = t[r0:r1]
        valid = tt != ignore_index
        safe = torch.where(valid, tt, torch.zeros_like(tt))
        lse = torch.logsumexp(z, -1)
        row_ce = lse - z.gather(-1, safe[:, None]).squeeze(-1)
        ce += torch.where(valid, row_ce, torch.zeros_like(row_ce)).sum()
        zt = z / temperature
        lp = torch.log_softmax(zt, -1)
        row_ent = -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
        ent += torch.where(valid, row_ent, torch.zeros_like(row_ent)).sum()
    return ce, ent


def divergence_for_beta(beta: float) -> dict:
    """TRL's generalized JSD convention as fastdistill options: beta 0 is forward KL, 1 reverse
    KL, in between ``jsd`` with that beta (the same mixture M = beta P + (1 - beta) Q)."""
    beta = float(beta)
    if not (0.0 <= beta <= 1.0) or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": beta}
