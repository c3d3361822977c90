"""The public loss functions: distill_loss, feature_loss (and linear_distill_loss, in linear.py).

Each reads top to bottom: check the arguments, flatten to rows, pick the backend, call the
custom op of ops.py (which holds the autograd and torch.compile registration).
"""

from __future__ import annotations

import torch

from fastdistill import _checks, backends, ops
from fastdistill._reduction import reduction_scale
from fastdistill.divergences import make_options

FEATURE_KINDS = ("mse", "cosine", "normalized_mse")


def _need_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl",
                 beta=0.5, temperature=1.0, t2_scale=False, hard_weight=0.0, soft_weight=1.0,
                 ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
                 backend="auto") -> torch.Tensor:
    """Distillation loss between student and teacher logits, with optional hard-label CE.

    Args:
        student_logits: ``[..., Vs]`` float32 / float16 / bfloat16; receives the gradient.
        teacher_logits: ``[..., Vt]`` same leading shape; gets no gradient.
        labels: ``[...]`` int64 or None. Rows with ``labels == ignore_index`` add nothing and
            get a zero gradient. Needed for ``hard_weight > 0``.
        divergence: ``forward_kl`` KL(P||Q), ``reverse_kl`` KL(Q||P), ``jsd``,
            ``skew_forward_kl``, ``skew_reverse_kl`` or ``tvd`` (see fastdistill.divergences),
            with P = softmax(teacher / T), Q = softmax(student / T).
        beta: mixing weight in [0, 1] of ``jsd`` / ``skew_*``.
        temperature: T > 0.
        t2_scale: multiply the divergence by T^2 (keeps gradient magnitudes T-independent).
        hard_weight, soft_weight: token loss = soft_weight * (T^2?) * D + hard_weight * CE,
            CE taken on the student logits at T = 1.
        reduction: ``mean`` (over non-ignored rows; 0 when there are none), ``sum`` or
            ``none`` (a float32 tensor of the leading shape, 0 at ignored rows).
        num_items_in_batch: with ``mean``, divide the sum by this instead (int or tensor).
        vocab_size: only the first ``vocab_size`` columns are real (padded vocabularies);
            required when the two widths differ. Padding columns get zero gradient.
        backend: ``auto``, ``triton``, ``cuda``, ``cpu`` or ``torch``.

    Returns:
        float32 loss: 0-d for ``mean`` / ``sum``, the leading shape for ``none``.
    """
    opts = make_options(divergence, beta, temperature, t2_scale, hard_weight, soft_weight,
                        ignore_index, reduction)
    _checks.tensor("student_logits", student_logits)
    _checks.tensor("teacher_logits", teacher_logits)
    lead = student_logits.shape[:-1]
    _checks.leading("teacher_logits", teacher_logits, lead, "student_logits")
    lab = _checks.labels(labels, lead) if labels is not None else None
    device = _checks.same_device(("student_logits", "teacher_logits", "labels"),
                                 (student_logits, teacher_logits, labels))
    V = _checks.vocab(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])
    if opts.hard_weight > 0 and lab is None:
        raise ValueError("hard_weight > 0 needs labels (the hard loss is CE against labels)")
    if lab is not None and opts.hard_weight > 0:
        _checks.label_range(lab, V, opts.ignore_index)
    n_items = _checks.num_items(num_items_in_batch, opts.reduction)
    name = backends.resolve(backend, device)

    s2, t2 = _checks.rows2d(student_logits), _checks.rows2d(teacher_logits)
    valid = (lab != opts.ignore_index).sum() if lab is not None else None
    scale = reduction_scale(opts.reduction, s2.shape[0], valid, n_items, device)
    per_row = opts.reduction == "none"
    loss, _ = ops.distill(s2, t2, lab, scale, opts.divergence, opts.beta, opts.temperature,
                          opts.t2_scale, opts.hard_weight, opts.soft_weight, opts.ignore_index,
                          V, per_row, name, _need_grad(student_logits))
    return loss.reshape(lead) if per_row else loss


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
    m = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != lead:
            raise ValueError(f"mask must have the features' leading shape {tuple(lead)}, got "
                             f"{tuple(mask.shape)}")
        m = mask.reshape(-1)
    device = _checks.same_device(("student", "teacher", "mask"), (student, teacher, mask))
    name = backends.resolve(backend, device)
    code = FEATURE_KINDS.index(kind)
    if projection is not None:
        from fastdistill.feature import projected_feature_loss
        return projected_feature_loss(student, teacher, projection, code, m, reduction, name)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student has {student.shape[-1]} features and teacher has "
                         f"{teacher.shape[-1]}; pass projection=[Dt, Ds] weight (or nn.Linear) "
                         "when the widths differ")
    if student.shape[-1] == 0:
        raise ValueError("student and teacher must have at least one feature, got 0")
    s2, t2 = _checks.rows2d(student), _checks.rows2d(teacher)
    valid = m.sum() if m is not None else None
    scale = reduction_scale(reduction, s2.shape[0], valid, None, device)
    per_row = reduction == "none"
    loss, _ = ops.feature(s2, t2, m, scale, code, per_row, name, _need_grad(student))
    return loss.reshape(lead) if per_row else loss
