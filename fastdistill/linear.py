"""linear_distill_loss: lm_head matmul + distillation loss without materialising the logits.

Reads top to bottom: options into a DistillConfig, the tensors checked, the rows prepared, then
the custom op ``fastdistill::linear_distill`` (ops.py), whose implementations are
backends/linear_chunked.py (mode="chunked", every backend) and backends/linear_fused.py
(mode="fused", Triton).

``mode="auto"`` is "chunked", on every device and for every divergence. Its work is the four
GEMMs of the floor plus the row kernel's passes over [chunk, V] float32 logits (predicted on an
H200 at 1.10x the four GEMMs for forward / reverse KL, 1.15x for jsd and tvd, at N = 8192, V =
128256, D = 4096, within 2 GB of extra memory). The fused mode never holds logits but must
recompute them in the backward: 6 GEMM units against the floor's 4 (1.5x) for the KL family,
8 (2x) for jsd, skew and tvd, whose row sums need the final log-sum-exps before a second sweep.
It is chosen explicitly, for its memory (within 256 MB of extra memory, independent of V).
"""

from __future__ import annotations

import torch

from fastdistill import _checks, _rows, backends, ops, topk
from fastdistill.config import DistillConfig
from fastdistill.distributed import is_vocab_parallel, vocab_parallel_linear_distill_loss


def _bias(name, b, width):
    if b is None:
        return None
    _checks.tensor(name, b)
    if b.dim() != 1 or b.shape[0] != width:
        raise ValueError(f"{name} must have shape [{width}] (one value per vocabulary row of the "
                         f"weight), got {tuple(b.shape)}")
    return b


def _weight(name, w, d, hidden_name):
    _checks.tensor(name, w)
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [V, D] matrix (as nn.Linear.weight), got shape "
                         f"{tuple(w.shape)}")
    if w.shape[1] != d:
        raise ValueError(f"{name} has {w.shape[1]} input features but {hidden_name} has {d}; "
                         f"{name} must be [V, {d}]")
    return w


def _hidden(name, h):
    _checks.tensor(name, h)
    if h.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one feature (last dimension), got shape "
                         f"{tuple(h.shape)}")
    return h


def linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                        labels=None, *, teacher_logits=None, student_bias=None,
                        teacher_bias=None, student_softcap=None, teacher_softcap=None,
                        divergence="forward_kl", beta=0.5, ratio=0.5, temperature=1.0,
                        t2_scale=False, hard_weight=0.0, soft_weight=1.0, ignore_index=-100,
                        reduction="mean", num_items_in_batch=None, vocab_size=None, mask=None,
                        student_logit_scale=None, teacher_logit_scale=None, shift_labels=False,
                        backend="auto", chunk_size=None, vocab_chunk_size=None,
                        mode="auto", teacher_topk=None, topk_tail="bucket",
                        vocab_group=None) -> torch.Tensor:
    """Distillation loss of ``student_hidden @ student_weight.T (+ bias)`` against the teacher,
    without materialising the logits.

    Args:
        student_hidden: ``[..., Ds]``; student_weight ``[Vs, Ds]`` (as nn.Linear.weight),
            student_bias ``[Vs]``; all three receive gradients.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., Dt]``, ``[Vt, Dt]``, ``[Vt]``
            (Dt may differ from Ds); or instead ``teacher_logits`` ``[..., Vt]`` precomputed.
            The teacher gets no gradient.
        student_softcap, teacher_softcap: logits become c * tanh(z / c) (Gemma-style), after
            the logit scale and before the temperature; also applied to ``teacher_logits`` (on
            a copy).
        chunk_size: rows per chunk (mode="chunked"; default: from a memory budget).
        vocab_chunk_size: vocabulary columns per backward chunk (mode="fused").
        mode: ``chunked`` (every backend), ``fused`` (Triton only, no logits in memory) or
            ``auto`` (= chunked: the faster one, see the module doc).
        teacher_topk, topk_tail: a sparse teacher ``(indices [..., K], logprobs [..., K])`` in
            place of teacher_hidden / teacher_weight (see :func:`fastdistill.distill_loss`);
            runs chunked: each chunk's student logits stream through the top-k row kernel.
        vocab_group: a ProcessGroup: the weights (and bias, teacher_logits) are this rank's
            contiguous vocabulary rows (ranks in order), the hidden states the same on every
            rank; also taken from DTensor weights placed ``Shard(0)``. See
            :func:`fastdistill.distributed.vocab_parallel_linear_distill_loss`.
        Every other keyword is that of :func:`fastdistill.distill_loss`, with the same
        semantics on the logits.

    Returns:
        float32 loss: 0-d, or the leading shape for ``reduction="none"``.
    """
    cfg = DistillConfig(divergence=divergence, beta=beta, ratio=ratio, temperature=temperature,
                        t2_scale=t2_scale, hard_weight=hard_weight, soft_weight=soft_weight,
                        ignore_index=ignore_index, reduction=reduction, vocab_size=vocab_size,
                        student_logit_scale=student_logit_scale,
                        teacher_logit_scale=teacher_logit_scale,
                        student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                        shift_labels=shift_labels, backend=backend, mode=mode,
                        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                        topk_tail=topk_tail)
    return linear_distill_loss_with(cfg, student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, labels, teacher_logits=teacher_logits,
                                    student_bias=student_bias, teacher_bias=teacher_bias,
                                    mask=mask, num_items_in_batch=num_items_in_batch,
                                    teacher_topk=teacher_topk, vocab_group=vocab_group)


def linear_distill_loss_with(cfg: DistillConfig, student_hidden, student_weight,
                             teacher_hidden=None, teacher_weight=None, labels=None, *,
                             teacher_logits=None, student_bias=None, teacher_bias=None,
                             mask=None, num_items_in_batch=None,
                             teacher_topk=None, vocab_group=None) -> torch.Tensor:
    """:func:`linear_distill_loss` with its options in a validated :class:`DistillConfig`."""
    if teacher_topk is not None and vocab_group is not None:
        raise ValueError("teacher_topk does not take vocab_group: a sparse teacher's indices "
                         "address the whole vocabulary")
    if teacher_topk is None and is_vocab_parallel(student_hidden, student_weight, student_bias, teacher_hidden,
                         teacher_weight, teacher_bias, teacher_logits, group=vocab_group):
        return vocab_parallel_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias,
            mask=mask, cfg=cfg, num_items_in_batch=num_items_in_batch, group=vocab_group)
    _hidden("student_hidden", student_hidden)
    lead, ds = student_hidden.shape[:-1], student_hidden.shape[-1]
    _weight("student_weight", student_weight, ds, "student_hidden")
    vs = student_weight.shape[0]
    _bias("student_bias", student_bias, vs)
    if teacher_topk is not None:
        if any(x is not None for x in (teacher_hidden, teacher_weight, teacher_bias,
                                       teacher_logits)):
            raise ValueError("pass either teacher_topk or a dense teacher (teacher_hidden + "
                             "teacher_weight, or teacher_logits), not both")
        return topk.linear_loss_topk(cfg, student_hidden, student_weight, teacher_topk, labels,
                                     student_bias=student_bias, mask=mask,
                                     num_items_in_batch=num_items_in_batch)
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_weight "
                             "(+ teacher_bias), not both")
        _checks.tensor("teacher_logits", teacher_logits)
        _checks.leading("teacher_logits", teacher_logits, lead, "student_hidden")
        vt, t_name = teacher_logits.shape[-1], "teacher_logits"
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is needed: pass teacher_hidden and teacher_weight, or "
                             "teacher_logits")
        _hidden("teacher_hidden", teacher_hidden)
        _checks.leading("teacher_hidden", teacher_hidden, lead, "student_hidden")
        _weight("teacher_weight", teacher_weight, teacher_hidden.shape[-1], "teacher_hidden")
        vt, t_name = teacher_weight.shape[0], "teacher_weight"
        _bias("teacher_bias", teacher_bias, vt)
    V = _checks.vocab(cfg.vocab_size, vs, vt, "student_weight", t_name)
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden",
             "teacher_weight", "teacher_bias", "teacher_logits", "labels", "mask")
    device = _checks.same_device(names, (student_hidden, student_weight, student_bias,
                                         teacher_hidden, teacher_weight, teacher_bias,
                                         teacher_logits, labels, mask))
    _checks.teacher_grad([("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                          ("teacher_bias", teacher_bias), ("teacher_logits", teacher_logits)],
                         "the student (hidden, weight, bias)",
                         any(x is not None and x.requires_grad
                             for x in (student_hidden, student_weight, student_bias)))
    rows = _rows.prepare(lead, student_hidden.shape[0] if student_hidden.dim() > 1 else 1,
                         labels, mask, ignore_index=cfg.ignore_index, reduction=cfg.reduction,
                         shift_labels=cfg.shift_labels, hard_weight=cfg.hard_weight, vocab=V,
                         num_items_in_batch=num_items_in_batch, device=device,
                         leading_name="student_hidden")
    name = backends.resolve(cfg.backend, device)
    mode = "chunked" if cfg.mode == "auto" else cfg.mode
    if mode == "fused" and name != "triton":
        raise backends.BackendUnavailableError(
            f"mode='fused' runs on the triton backend only (got backend {name!r})")

    def detached(x, dim):
        return x.detach().reshape(-1, x.shape[-1]) if x is not None and dim else \
            (x.detach() if x is not None else None)

    grad_on = torch.is_grad_enabled()
    k = cfg.kernel_options()
    loss, _, _, _ = ops.linear_distill(
        student_hidden.reshape(-1, ds), student_weight, student_bias,
        detached(teacher_hidden, True), detached(teacher_weight, False),
        detached(teacher_bias, False),
        _checks.rows2d(teacher_logits.detach()) if teacher_logits is not None else None,
        rows.labels, rows.scale, None,
        k.divergence, k.beta, 1.0 / cfg.temperature,
        cfg.soft_scale, cfg.hard_weight, cfg.ignore_index, V,
        cfg.student_logit_scale or 1.0, cfg.teacher_logit_scale or 1.0, cfg.student_softcap,
        cfg.teacher_softcap, rows.per_row, mode, name, cfg.chunk_size or 0,
        cfg.vocab_chunk_size or 0, grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad)
    return rows.output(loss)
