"""Sparse (top-k) teachers: ``teacher_topk=(indices, logprobs)`` in place of the teacher.

``distill_loss(student_logits, None, labels, teacher_topk=(indices, logprobs))`` and
``linear_distill_loss(student_hidden, student_weight, None, None, labels, teacher_topk=...)``
route here. Reads top to bottom: the checks of the two tensors, then the custom ops
``fastdistill::topk_distill`` (logits) and ``fastdistill::linear_topk_distill`` (hidden states,
chunked), whose implementations are the backends' ``topk_forward`` (the contract is written in
fastdistill/backends/torch_backend.py).

Semantics (the formulas and their gradients are in fastdistill/reference.py, next to the float64
reference ``reference_topk_distill_loss``): ``indices [..., K]`` int32 / int64 are distinct
vocabulary entries, ``logprobs [..., K]`` float32 / float16 / bfloat16 the teacher's
log-probabilities at the loss's temperature, used as given. ``topk_tail``: "bucket" (K + 1
bins, the student's mass outside the indices against 1 - sum exp(logprobs)), "none" (the K
support terms, student probabilities from the full softmax) or "renormalize" (both restricted
to the indices and renormalised).

Kernels (every backend, fused): the student row streams over the vocabulary at most twice (the
log-sum-exp outside the indices, then the gradient; "renormalize" without a hard loss reads only
the K logits and writes zeros elsewhere), the teacher costs O(K) per row, and the extra memory
is O(N K) (a float32 [N, K] workspace for the gradient at the indices) plus, on the GPU, the
membership bitmask of the rows in flight (V bits each: shared memory per CUDA block, a
[programs, V / 32] int32 buffer for the persistent Triton programs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdistill import _checks, _rows, backends
from fastdistill.config import TOPK_TAILS, DistillConfig, KernelOptions

INDEX_DTYPES = (torch.int32, torch.int64)


def tail_code(tail: str) -> int:
    return TOPK_TAILS.index(tail)


# ---- checks --------------------------------------------------------------------------------------

def check_topk(teacher_topk, lead: torch.Size, lead_name: str) -> Tuple[Tensor, Tensor]:
    """(indices, logprobs) of ``teacher_topk``, checked against the inputs' leading shape;
    TypeError / ValueError naming the argument otherwise."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices [..., K], logprobs [..., K]), got "
                        f"{type(teacher_topk).__name__}"
                        + (f" of length {len(teacher_topk)}"
                           if isinstance(teacher_topk, (tuple, list)) else ""))
    idx, lp = teacher_topk
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"teacher_topk indices must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_topk indices must be int32 or int64, got {idx.dtype}")
    _checks.tensor("teacher_topk logprobs", lp)
    if idx.dim() < 1 or idx.shape[-1] < 1:
        raise ValueError(f"teacher_topk indices must be [..., K] with K >= 1, got shape "
                         f"{tuple(idx.shape)}")
    if idx.shape[:-1] != lead:
        raise ValueError(f"teacher_topk indices have leading shape {tuple(idx.shape[:-1])} but "
                         f"{lead_name} has {tuple(lead)}; they must match ([..., K])")
    if lp.shape != idx.shape:
        raise ValueError(f"teacher_topk logprobs must have the shape of the indices "
                         f"{tuple(idx.shape)}, got {tuple(lp.shape)}")
    if idx.device != lp.device:
        raise ValueError(f"teacher_topk indices are on {idx.device} but logprobs on {lp.device}")
    return idx, lp


def check_indices(idx: Tensor, labels: Optional[Tensor], ignore_index: int, vocab: int) -> None:
    """Indices outside [0, vocab) or repeated within a row that counts: a ValueError for CPU
    tensors. On a GPU the check would synchronise; the kernels give such a row a NaN loss and a
    zero gradient instead."""
    if idx.device.type != "cpu" or idx.numel() == 0 or torch.compiler.is_compiling():
        return
    counted = (labels != ignore_index) if labels is not None else None
    rng = ((idx < 0) | (idx >= vocab)).any(-1)
    if counted is not None:
        rng &= counted
    if bool(rng.any()):
        r = int(rng.nonzero()[0, 0])
        row = idx[r]
        v = int(row[(row < 0) | (row >= vocab)][0])
        raise ValueError(f"teacher_topk indices must be in [0, {vocab}) (the vocabulary), found "
                         f"{v} in row {r}")
    if idx.shape[1] > 1:
        s = idx.sort(-1).values
        dup = (s.diff(dim=-1) == 0).any(-1)
        if counted is not None:
            dup &= counted
        if bool(dup.any()):
            r = int(dup.nonzero()[0, 0])
            srow = s[r]
            v = int(srow[1:][srow.diff() == 0][0])
            raise ValueError(f"teacher_topk indices must be distinct within a row, found {v} "
                             f"twice in row {r}")


def _options(cfg: DistillConfig):
    if cfg.teacher_logit_scale is not None or cfg.teacher_softcap is not None:
        raise ValueError("teacher_logit_scale / teacher_softcap do not apply to teacher_topk: "
                         "its logprobs are used as given (extract them at the loss's "
                         "temperature)")


# ---- fastdistill::topk_distill (logits) ----------------------------------------------------------

@torch.library.custom_op("fastdistill::topk_distill", mutates_args=())
def topk_distill(student: Tensor, indices: Tensor, logprobs: Tensor, labels: Optional[Tensor],
                 scale: Tensor, divergence: int, beta: float, s_mul: float, h_mul: float,
                 soft_scale: float, hard_weight: float, ignore_index: int, vocab: int, tail: int,
                 per_row: bool, backend: str, need_grad: bool) -> Tuple[Tensor, Tensor]:
    """Loss and student gradient for 2-D ``student [N, Vs]`` against ``indices [N, K]``,
    ``logprobs [N, K]``; returns ``(loss, grad)`` as ``fastdistill::distill`` does."""
    opts = KernelOptions(divergence, beta, s_mul, 1.0, h_mul, soft_scale, hard_weight,
                         ignore_index)
    rows, grad = backends.get(backend).topk_forward(student, indices, logprobs, labels, opts,
                                                    tail, vocab, scale, need_grad)
    loss = rows if per_row else rows.sum() * scale
    return loss, (grad if grad is not None else student.new_empty(0))


@topk_distill.register_fake
def _(student, indices, logprobs, labels, scale, divergence, beta, s_mul, h_mul, soft_scale,
      hard_weight, ignore_index, vocab, tail, per_row, backend, need_grad):
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if need_grad else (0,))
    return loss, grad


def _topk_backward(ctx, g_loss, g_grad):
    from fastdistill import ops
    if not ctx.need_grad:
        raise ops._need_grad_error()
    (grad,) = ctx.saved_tensors
    return (ops._apply_grad_output(grad, g_loss),) + (None,) * 16


def _register():
    from fastdistill import ops
    torch.library.register_autograd("fastdistill::topk_distill", _topk_backward,
                                    setup_context=ops._distill_setup)


_register()


def distill_loss_topk(cfg: DistillConfig, student_logits, teacher_topk, labels=None, *,
                      mask=None, num_items_in_batch=None) -> Tensor:
    """:func:`fastdistill.distill_loss` with ``teacher_topk`` in place of the teacher logits."""
    _options(cfg)
    _checks.tensor("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    idx, lp = check_topk(teacher_topk, lead, "student_logits")
    Vs = student_logits.shape[-1]
    V = _checks.vocab(cfg.vocab_size, Vs, Vs)
    device = _checks.same_device(("student_logits", "teacher_topk indices", "labels", "mask"),
                                 (student_logits, idx, labels, mask))
    _checks.teacher_grad([("teacher_topk logprobs", lp)], "student_logits",
                         student_logits.requires_grad)
    rows = _rows.prepare(lead, student_logits.shape[0] if student_logits.dim() > 1 else 1,
                         labels, mask, ignore_index=cfg.ignore_index, reduction=cfg.reduction,
                         shift_labels=cfg.shift_labels, hard_weight=cfg.hard_weight, vocab=V,
                         num_items_in_batch=num_items_in_batch, device=device)
    i2, l2 = _checks.rows2d(idx), _checks.rows2d(lp.detach())
    check_indices(i2, rows.labels, cfg.ignore_index, V)
    name = backends.resolve(cfg.backend, device)
    s2 = _checks.rows2d(student_logits)
    k = cfg.kernel_options()
    need = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = topk_distill(s2, i2, l2, rows.labels, rows.scale, k.divergence, k.beta, k.s_mul,
                           k.h_mul, k.soft_scale, k.hard_weight, k.ignore_index, V,
                           tail_code(cfg.topk_tail), rows.per_row, name, need)
    return rows.output(loss)


# ---- fastdistill::linear_topk_distill (hidden states, chunked) -----------------------------------

def _linear_forward(h_s, w_s, b_s, indices, logprobs, labels, scale, row_factor, opts, tail, vocab,
                    s_scale, s_cap, backend, chunk_rows, needs):
    """(rows [N], [grad_hidden, grad_weight, grad_bias]) over row chunks: the chunk's logits in
    float32 (never rounded to 16 bits), the backend's topk_forward writes the logit gradient
    over them (fastdistill/_chunked.py carries it into the three gradients)."""
    from fastdistill._chunked import default_chunk, run_chunks
    impl = backends.get(backend)
    N = h_s.shape[0]
    chunk = chunk_rows or default_chunk(N, w_s.shape[0], h_s.device, buffers=4)

    def row_fn(r0, r1, z, need_grad, sc):
        lab = labels[r0:r1] if labels is not None else None
        return impl.topk_forward(z, indices[r0:r1], logprobs[r0:r1], lab, opts, tail, vocab, sc,
                                 need_grad, grad_out=z)

    pre = s_scale if s_cap is not None else 1.0
    return run_chunks(h_s, w_s, b_s, row_fn, chunk, s_cap, pre, needs, scale, row_factor)


@torch.library.custom_op("fastdistill::linear_topk_distill", mutates_args=())
def linear_topk_distill(h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], indices: Tensor,
                        logprobs: Tensor, labels: Optional[Tensor], scale: Tensor,
                        row_factor: Optional[Tensor], divergence: int, beta: float, inv_t: float,
                        soft_scale: float, hard_weight: float, ignore_index: int, vocab: int,
                        s_scale: float, s_cap: Optional[float], tail: int, per_row: bool,
                        backend: str, chunk_rows: int, need_h: bool, need_w: bool, need_b: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss of ``h_s [N, Ds] @ w_s [Vs, Ds].T (+ b_s)`` against ``indices``, ``logprobs``
    ``[N, K]``, with the gradients computed in the same call (the conventions of
    ``fastdistill::linear_distill``)."""
    # the logit scale is folded into the row kernel, unless a softcap comes first
    ks = 1.0 if s_cap is not None else s_scale
    opts = KernelOptions(divergence, beta, ks * inv_t, 1.0, ks, soft_scale, hard_weight,
                         ignore_index)
    needs = (need_h and not per_row, need_w and not per_row,
             need_b and b_s is not None and not per_row)
    rows, (g_h, g_w, g_b) = _linear_forward(h_s, w_s, b_s, indices, logprobs, labels, scale,
                                            row_factor, opts, tail, vocab, s_scale, s_cap,
                                            backend, chunk_rows, needs)
    loss = rows if per_row else rows.sum() * scale
    return (loss, g_h.to(h_s.dtype) if g_h is not None else h_s.new_empty(0),
            g_w.to(w_s.dtype) if g_w is not None else h_s.new_empty(0),
            g_b.to(b_s.dtype) if g_b is not None else h_s.new_empty(0))


@linear_topk_distill.register_fake
def _(h_s, w_s, b_s, indices, logprobs, labels, scale, row_factor, divergence, beta, inv_t,
      soft_scale, hard_weight, ignore_index, vocab, s_scale, s_cap, tail, per_row, backend,
      chunk_rows, need_h, need_w, need_b):
    loss = h_s.new_empty((h_s.shape[0],) if per_row else (), dtype=torch.float32)
    want = not per_row
    return (loss, h_s.new_empty(h_s.shape) if need_h and want else h_s.new_empty(0),
            w_s.new_empty(w_s.shape) if need_w and want else h_s.new_empty(0),
            b_s.new_empty(b_s.shape) if need_b and want and b_s is not None
            else h_s.new_empty(0))


_LIN_TENSORS = 8  # tensor inputs of linear_topk_distill, before the options
_LIN_PER_ROW = 10  # index of per_row among the options


def _linear_setup(ctx, inputs, output):
    ctx.opts = inputs[_LIN_TENSORS:]
    ctx.per_row = ctx.opts[_LIN_PER_ROW]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    if ctx.per_row:  # backward recomputes with the per-row grad_output
        ctx.save_for_backward(*inputs[:6])
    else:
        ctx.save_for_backward(*output[1:])


def _linear_backward(ctx, g_loss, *unused):
    from fastdistill import ops
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    n_none = _LIN_TENSORS - 3 + len(ctx.opts)
    if g_loss is None:
        return (None,) * (n_none + 3)
    if ctx.per_row:
        h_s, w_s, b_s, idx, lp, labels = ctx.saved_tensors
        opts = list(ctx.opts)
        opts[_LIN_PER_ROW] = False
        opts[-3:] = [need_h, need_w, need_b]
        one = torch.ones((), dtype=torch.float32, device=h_s.device)
        _, g_h, g_w, g_b = linear_topk_distill(h_s, w_s, b_s, idx, lp, labels, one,
                                               g_loss.to(torch.float32).contiguous(), *opts)
    else:
        g_h, g_w, g_b = ctx.saved_tensors
        if not any(ctx.opts[-3:]):
            raise ops._need_grad_error()
        g_h, g_w, g_b = (ops._apply_grad_output(g, g_loss) if g.numel() else g
                         for g in (g_h, g_w, g_b))
    return (g_h if need_h else None, g_w if need_w else None,
            g_b if need_b and g_b.numel() else None) + (None,) * n_none


torch.library.register_autograd("fastdistill::linear_topk_distill", _linear_backward,
                                setup_context=_linear_setup)


def linear_loss_topk(cfg: DistillConfig, student_hidden, student_weight, teacher_topk,
                     labels=None, *, student_bias=None, mask=None,
                     num_items_in_batch=None) -> Tensor:
    """:func:`fastdistill.linear_distill_loss` with ``teacher_topk`` in place of the teacher.
    The linear module's checks of hidden / weight / bias have run (fastdistill/linear.py)."""
    _options(cfg)
    lead = student_hidden.shape[:-1]
    idx, lp = check_topk(teacher_topk, lead, "student_hidden")
    vs = student_weight.shape[0]
    V = _checks.vocab(cfg.vocab_size, vs, vs, "student_weight", "student_weight")
    device = _checks.same_device(("student_hidden", "student_weight", "student_bias",
                                  "teacher_topk indices", "labels", "mask"),
                                 (student_hidden, student_weight, student_bias, idx, labels,
                                  mask))
    _checks.teacher_grad([("teacher_topk logprobs", lp)], "the student (hidden, weight, bias)",
                         any(x is not None and x.requires_grad
                             for x in (student_hidden, student_weight, student_bias)))
    rows = _rows.prepare(lead, student_hidden.shape[0] if student_hidden.dim() > 1 else 1,
                         labels, mask, ignore_index=cfg.ignore_index, reduction=cfg.reduction,
                         shift_labels=cfg.shift_labels, hard_weight=cfg.hard_weight, vocab=V,
                         num_items_in_batch=num_items_in_batch, device=device,
                         leading_name="student_hidden")
    i2, l2 = _checks.rows2d(idx), _checks.rows2d(lp.detach())
    check_indices(i2, rows.labels, cfg.ignore_index, V)
    name = backends.resolve(cfg.backend, device)
    if cfg.mode == "fused":
        raise ValueError("teacher_topk runs in mode='chunked' (or 'auto'): the fused mode "
                         "computes the teacher's logits from its hidden states, and a sparse "
                         "teacher has none; chunked mode streams the student's chunk of logits "
                         "through the top-k row kernel (extra memory O(chunk x V) + O(N K))")
    grad_on = torch.is_grad_enabled()
    ds = student_hidden.shape[-1]
    loss, _, _, _ = linear_topk_distill(
        student_hidden.reshape(-1, ds), student_weight, student_bias, i2, l2, rows.labels,
        rows.scale, None, cfg.kernel_options().divergence, cfg.kernel_options().beta,
        1.0 / cfg.temperature, cfg.soft_scale, cfg.hard_weight, cfg.ignore_index, V,
        cfg.student_logit_scale or 1.0, cfg.student_softcap, tail_code(cfg.topk_tail),
        rows.per_row, name, cfg.chunk_size or 0,
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad)
    return rows.output(loss)
