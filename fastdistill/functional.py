"""The public logit-level and feature losses: distill_loss, feature_loss (and
linear_distill_loss, in linear.py).

Each reads top to bottom: options into a DistillConfig (validated once), the tensors checked and
flattened to rows, the backend picked, then the custom op of ops.py (which holds the autograd and
the torch.compile registration).
"""

from __future__ import annotations

import torch

from fastdistill import _checks, _rows, backends, ops, topk
from fastdistill.config import FEATURE_KINDS, DistillConfig
from fastdistill.distributed import is_vocab_parallel, vocab_parallel_distill_loss


def _need_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _logit_tensors(student_logits, teacher_logits, vocab_size) -> int:
    """Checks the logits and their widths; returns the real vocabulary size V."""
    _checks.tensor("student_logits", student_logits)
    _checks.tensor("teacher_logits", teacher_logits)
    _checks.leading("teacher_logits", teacher_logits, student_logits.shape[:-1], "student_logits")
    return _checks.vocab(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl",
                 beta=0.5, ratio=0.5, temperature=1.0, t2_scale=False, hard_weight=0.0,
                 soft_weight=1.0, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                 vocab_size=None, mask=None, student_logit_scale=None, teacher_logit_scale=None,
                 shift_labels=False, teacher_topk=None, topk_tail="bucket",
                 backend="auto", vocab_group=None) -> torch.Tensor:
    """Distillation loss between student and teacher logits, with optional hard-label CE.

    With P = softmax(teacher_logit_scale * teacher_logits / T) and Q = softmax(
    student_logit_scale * student_logits / T), per token:
    ``soft_weight * (T^2 if t2_scale else 1) * D(P, Q) + hard_weight * CE``.

    Args:
        student_logits: ``[..., Vs]`` float32 / float16 / bfloat16; receives the gradient.
        teacher_logits: ``[..., Vt]`` same leading shape; gets no gradient.
        labels: ``[...]`` int64 or None. Rows with ``labels == ignore_index`` add nothing and
            get a zero gradient. Needed for ``hard_weight > 0``.
        divergence: ``forward_kl`` KL(P||Q), ``reverse_kl`` KL(Q||P), ``jsd``,
            ``skew_forward_kl``, ``skew_reverse_kl``, ``tvd`` or ``symmetric_kl``
            (ratio KL(P||Q) + (1 - ratio) KL(Q||P)); see fastdistill.reference.
        beta: mixing weight in [0, 1] of ``jsd`` / ``skew_*``; ratio: of ``symmetric_kl``.
        temperature: T > 0.
        t2_scale: multiply the divergence by T^2 (keeps gradient magnitudes T-independent).
        hard_weight, soft_weight: the weights above; CE is taken on the (scaled) student
            logits at T = 1.
        reduction: ``mean`` (over counted rows; 0 when there are none), ``sum``, ``none`` (a
            float32 tensor of the leading shape, 0 at rows that do not count) or ``batchmean``
            (TRL's: sum / counted rows with labels or a mask, sum / input.shape[0] without).
        num_items_in_batch: with ``mean``, divide the sum by this instead (int or tensor).
        vocab_size: only the first ``vocab_size`` columns are real (padded vocabularies);
            required when the two widths differ. Padding columns get zero gradient.
        mask: ``[...]`` bool; only True tokens count (with labels: both must agree).
        student_logit_scale, teacher_logit_scale: the logits are multiplied by these first.
        shift_labels: causal LMs: the same as passing ``logits[..., :-1, :]`` and
            ``labels[..., 1:]`` (and ``mask[..., 1:]``), without copying the logits.
        teacher_topk: ``(indices [..., K], logprobs [..., K])`` in place of the teacher
            (``teacher_logits=None``): a sparse teacher, e.g. stored by
            ``fastdistill.offline`` or served by vLLM; the logprobs are the teacher's
            log-probabilities at ``temperature``, used as given (fastdistill/topk.py).
        topk_tail: ``bucket``, ``none`` or ``renormalize``: what becomes of the mass outside
            the K indices (formulas in fastdistill/reference.py).
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.
        vocab_group: a ProcessGroup: the logits are this rank's contiguous vocabulary slice
            (ranks in order); also taken from DTensor logits placed ``Shard(-1)``. See
            :func:`fastdistill.distributed.vocab_parallel_distill_loss`.

    Returns:
        float32 loss: 0-d, or the leading shape for ``none``.
    """
    if vocab_group is None and teacher_topk is None and teacher_logits is not None:
        _logit_tensors(student_logits, teacher_logits, vocab_size)
    cfg = DistillConfig(divergence=divergence, beta=beta, ratio=ratio, temperature=temperature,
                        t2_scale=t2_scale, hard_weight=hard_weight, soft_weight=soft_weight,
                        ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                        student_logit_scale=student_logit_scale,
                        teacher_logit_scale=teacher_logit_scale, shift_labels=shift_labels,
                        topk_tail=topk_tail, backend=backend)
    return distill_loss_with(cfg, student_logits, teacher_logits, labels, mask=mask,
                             num_items_in_batch=num_items_in_batch, teacher_topk=teacher_topk,
                             vocab_group=vocab_group)


def distill_loss_with(cfg: DistillConfig, student_logits, teacher_logits, labels=None, *,
                      mask=None, num_items_in_batch=None, teacher_topk=None,
                      vocab_group=None) -> torch.Tensor:
    """:func:`distill_loss` with its options in a validated :class:`DistillConfig` (what the
    modules and trainers call)."""
    if cfg.student_softcap is not None or cfg.teacher_softcap is not None:
        raise ValueError("student_softcap / teacher_softcap apply to linear_distill_loss; "
                         "distill_loss takes logits that are already capped")
    if teacher_topk is not None:
        if teacher_logits is not None:
            raise ValueError("pass either teacher_logits or teacher_topk, not both")
        if vocab_group is not None:
            raise ValueError("teacher_topk does not take vocab_group: a sparse teacher's "
                             "indices address the whole vocabulary")
        return topk.distill_loss_topk(cfg, student_logits, teacher_topk, labels, mask=mask,
                                      num_items_in_batch=num_items_in_batch)
    if teacher_logits is None:
        raise TypeError("teacher_logits must be a torch.Tensor, got NoneType (or pass "
                        "teacher_topk=(indices, logprobs) for a sparse teacher)")
    if is_vocab_parallel(student_logits, teacher_logits, group=vocab_group):
        return vocab_parallel_distill_loss(student_logits, teacher_logits, labels, mask, cfg,
                                           num_items_in_batch, vocab_group)
    V = _logit_tensors(student_logits, teacher_logits, cfg.vocab_size)
    lead = student_logits.shape[:-1]
    device = _checks.same_device(("student_logits", "teacher_logits", "labels", "mask"),
                                 (student_logits, teacher_logits, labels, mask))
    _checks.teacher_grad([("teacher_logits", teacher_logits)], "student_logits",
                         student_logits.requires_grad)
    rows = _rows.prepare(lead, student_logits.shape[0] if student_logits.dim() > 1 else 1,
                         labels, mask, ignore_index=cfg.ignore_index, reduction=cfg.reduction,
                         shift_labels=cfg.shift_labels, hard_weight=cfg.hard_weight, vocab=V,
                         num_items_in_batch=num_items_in_batch, device=device)
    name = backends.resolve(cfg.backend, device)
    s2, t2 = _checks.rows2d(student_logits), _checks.rows2d(teacher_logits.detach())
    k = cfg.kernel_options()
    loss, _ = ops.distill(s2, t2, rows.labels, rows.scale, k.divergence, k.beta, k.s_mul,
                          k.t_mul, k.h_mul, k.soft_scale, k.hard_weight, k.ignore_index, V,
                          rows.per_row, name, _need_grad(student_logits))
    return rows.output(loss)


def feature_loss(student, teacher, *, kind="mse", mask=None, projection=None, reduction="mean",
                 backend="auto") -> torch.Tensor:
    """Hidden-state matching loss between student and teacher features.

    Args:
        student: ``[..., Ds]`` float32 / float16 / bfloat16; receives the gradient.
        teacher: ``[..., Dt]`` same leading shape; gets no gradient. Dt must equal Ds unless a
            projection is given.
        kind: per token, ``mse`` mean_j (s_j - t_j)^2; ``cosine`` 1 - cos(s, t) (norms clamped
            at 1e-8); ``normalized_mse`` the mse after layer normalisation without affine terms
            (eps 1e-5) of both.
        mask: ``[...]`` bool; only True tokens count (others add 0 and get zero gradient).
        projection: optional ``[Dt, Ds]`` weight or ``nn.Linear(Ds, Dt)`` applied to the student
            first (it receives a gradient); tokens go through it in chunks.
        reduction: ``mean`` over selected tokens (0 when none), ``sum`` or ``none``.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.

    Returns:
        float32 loss: 0-d, or the leading shape for ``none``.
    """
    if not isinstance(kind, str) or kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    _checks.tensor("student", student)
    _checks.tensor("teacher", teacher)
    lead = student.shape[:-1]
    _checks.leading("teacher", teacher, lead, "student")
    m = _checks.mask(mask, lead, "features'") if mask is not None else None
    device = _checks.same_device(("student", "teacher", "mask"), (student, teacher, mask))
    _checks.teacher_grad([("teacher", teacher)], "student", student.requires_grad)
    for n, x in (("student", student), ("teacher", teacher)):
        if x.shape[-1] == 0:
            raise ValueError(f"{n} must have at least one feature (last dimension), got shape "
                             f"{tuple(x.shape)}")
    name = backends.resolve(backend, device)
    code = FEATURE_KINDS.index(kind)
    teacher = teacher.detach()
    if projection is not None:
        from fastdistill.feature import projected_feature_loss
        return projected_feature_loss(student, teacher, projection, code, m, reduction, name)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student has {student.shape[-1]} features and teacher has "
                         f"{teacher.shape[-1]}; pass projection=[Dt, Ds] weight (or nn.Linear) "
                         "when the widths differ")
    s2, t2 = _checks.rows2d(student), _checks.rows2d(teacher)
    scale = _rows.prepare(lead, 1, None, mask, ignore_index=-100, reduction=reduction,
                          shift_labels=False, hard_weight=0.0, vocab=1, num_items_in_batch=None,
                          device=device).scale
    per_row = reduction == "none"
    loss, _ = ops.feature(s2, t2, m, scale, code, per_row, name, _need_grad(student))
    return loss.reshape(lead) if per_row else loss
