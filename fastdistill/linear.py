"""linear_distill_loss: lm_head matmul + distillation loss without materialising the logits.

mode="chunked" (every backend): rows go in chunks; per chunk the student and teacher logits
come from the matmul in float32 (never rounded to 16 bits before the softmax), the logit-level
kernel of the chosen backend turns them into the row losses and the gradient in place, and the
gradient flows into grad_hidden, grad_weight (float32 accumulation) and grad_bias right away
(fastdistill/_chunked.py). Extra memory: O(chunk x V).

mode="fused" (triton): no logits in global memory at all (fastdistill/kernels/linear.py). Extra memory: O(N)
plus the gradients.
"""

from __future__ import annotations

import numbers

import torch

from fastdistill import _checks, backends
from fastdistill._chunked import chunked_linear_loss, default_chunk, mm_f32
from fastdistill._reduction import reduction_scale
from fastdistill.divergences import make_options

MODES = ("auto", "chunked", "fused")


def _softcap(name, c):
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{name} must be a positive number or None, got {type(c).__name__}")
    if not (float(c) > 0 and float(c) < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {c}")
    return float(c)


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


def linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                        labels=None, *, teacher_logits=None, student_bias=None,
                        teacher_bias=None, student_softcap=None, teacher_softcap=None,
                        divergence="forward_kl", beta=0.5, temperature=1.0, t2_scale=False,
                        hard_weight=0.0, soft_weight=1.0, ignore_index=-100, reduction="mean",
                        num_items_in_batch=None, vocab_size=None, backend="auto",
                        chunk_size=None, mode="auto") -> torch.Tensor:
    """Distillation loss of ``student_hidden @ student_weight.T (+ bias)`` against the teacher,
    without materialising the logits.

    Args:
        student_hidden: ``[..., Ds]``; student_weight ``[Vs, Ds]`` (as nn.Linear.weight),
            student_bias ``[Vs]``; all three receive gradients.
        teacher_hidden, teacher_weight, teacher_bias: ``[..., Dt]``, ``[Vt, Dt]``, ``[Vt]``
            (Dt may differ from Ds); or instead ``teacher_logits`` ``[..., Vt]`` precomputed.
            The teacher gets no gradient.
        student_softcap, teacher_softcap: logits become c * tanh(z / c) first (Gemma-style).
        chunk_size: rows per chunk in chunked mode (default: from a memory budget).
        mode: ``chunked``, ``fused`` (Triton only, no logits in memory) or ``auto``.
        Every other keyword is that of :func:`fastdistill.distill_loss`, with the same
        semantics on the logits.

    Returns:
        float32 loss: 0-d, or the leading shape for ``reduction="none"``.
    """
    opts = make_options(divergence, beta, temperature, t2_scale, hard_weight, soft_weight,
                        ignore_index, reduction)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _checks.tensor("student_hidden", student_hidden)
    device = student_hidden.device
    lead, ds = student_hidden.shape[:-1], student_hidden.shape[-1]
    _weight("student_weight", student_weight, ds, "student_hidden")
    vs = student_weight.shape[0]
    s_bias = _bias("student_bias", student_bias, vs)
    s_cap = _softcap("student_softcap", student_softcap)
    t_cap = _softcap("teacher_softcap", teacher_softcap)

    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("pass either teacher_logits or teacher_hidden + teacher_weight "
                             "(+ teacher_bias), not both")
        _checks.tensor("teacher_logits", teacher_logits)
        _checks.leading("teacher_logits", teacher_logits, lead, "student_hidden")
        vt = teacher_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is needed: pass teacher_hidden and teacher_weight, or "
                             "teacher_logits")
        _checks.tensor("teacher_hidden", teacher_hidden)
        _checks.leading("teacher_hidden", teacher_hidden, lead, "student_hidden")
        _weight("teacher_weight", teacher_weight, teacher_hidden.shape[-1], "teacher_hidden")
        vt = teacher_weight.shape[0]
        _bias("teacher_bias", teacher_bias, vt)
    V = _checks.vocab(vocab_size, vs, vt, "student_weight", "teacher_weight"
                      if teacher_logits is None else "teacher_logits")
    lab = _checks.labels(labels, lead) if labels is not None else None
    names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden",
             "teacher_weight", "teacher_bias", "teacher_logits", "labels")
    _checks.same_device(names, (student_hidden, student_weight, student_bias, teacher_hidden,
                                teacher_weight, teacher_bias, teacher_logits, labels))
    if opts.hard_weight > 0 and lab is None:
        raise ValueError("hard_weight > 0 needs labels (the hard loss is CE against labels)")
    if lab is not None and opts.hard_weight > 0:
        _checks.label_range(lab, V, opts.ignore_index)
    n_items = _checks.num_items(num_items_in_batch, opts.reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    name = backends.resolve(backend, device)
    if mode == "auto":
        mode = "chunked"
    if mode == "fused" and name != "triton":
        raise backends.BackendUnavailableError(
            f"mode='fused' runs on the triton backend only (got backend {name!r})")

    h_s = student_hidden.reshape(-1, ds)
    N = h_s.shape[0]
    valid = (lab != opts.ignore_index).sum() if lab is not None else None
    scale = reduction_scale(opts.reduction, N, valid, n_items, device)
    per_row = opts.reduction == "none"
    if teacher_logits is not None:
        t_logits, h_t = _checks.rows2d(teacher_logits), None
    else:
        t_logits, h_t = None, teacher_hidden.reshape(-1, teacher_hidden.shape[-1])

    if mode == "fused":
        from fastdistill.kernels import linear as fused
        problem = fused._Problem(h_s, student_weight, s_bias, h_t, teacher_weight, teacher_bias,
                                 t_logits, lab, opts, V, s_cap, t_cap)
        loss = FusedLinearDistill.apply(h_s, student_weight, s_bias, problem, scale, per_row,
                                        chunk_size)
        return loss.reshape(lead) if per_row else loss

    impl = backends.get(name)
    width = max(vs, vt)
    chunk = int(chunk_size or default_chunk(N, width, device, buffers=4))
    # float32 teacher weights: one [chunk, Vt] buffer reused by every chunk (see _chunked.py)
    t_w = None if t_logits is not None else \
        (teacher_weight if teacher_weight.is_cuda and teacher_weight.dtype != torch.float32
         else teacher_weight.float())
    t_buf = []

    def teacher_chunk(r0, r1):
        with torch.no_grad():
            if t_logits is not None:
                if t_cap is None:
                    return t_logits[r0:r1]
                z = t_logits[r0:r1].to(torch.float32, copy=True)  # the input stays untouched
            else:
                h = h_t[r0:r1] if t_w.dtype != torch.float32 else h_t[r0:r1].float()
                if t_w.dtype == torch.float32 and not t_buf:
                    t_buf.append(torch.empty(min(chunk, N), vt, dtype=torch.float32,
                                             device=device))
                z = mm_f32(h, t_w.t(), out=t_buf[0][:r1 - r0] if t_buf else None)
                if teacher_bias is not None:
                    z += teacher_bias.float()
            if t_cap is not None:
                z = torch.tanh(z.div_(t_cap)).mul_(t_cap)
        return z

    def row_fn(r0, r1, z, need_grad, grad_scale):
        lab_c = lab[r0:r1] if lab is not None else None
        return impl.distill_forward(z, teacher_chunk(r0, r1), lab_c, opts, V, grad_scale,
                                    need_grad, grad_out=z)

    loss = chunked_linear_loss(h_s, student_weight, s_bias, row_fn, chunk, s_cap, per_row, scale)
    return loss.reshape(lead) if per_row else loss


class FusedLinearDistill(torch.autograd.Function):
    """mode="fused": statistics in the forward, gradient recomputed tile by tile in backward
    (fastdistill/kernels/linear.py). Backward folds grad_output into the per-row factors, so it serves
    every reduction, including "none", in one sweep."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, problem, scale, per_row, chunk_v):
        from fastdistill.kernels import linear as fused
        stats, rows = fused.forward_stats(problem)
        ctx.problem, ctx.stats, ctx.scale, ctx.per_row, ctx.chunk_v = (problem, stats, scale,
                                                                       per_row, chunk_v)
        return rows if per_row else rows.sum() * scale

    @staticmethod
    def backward(ctx, g_out):
        from fastdistill.kernels import linear as fused
        P, stats = ctx.problem, ctx.stats
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rowf = g_out.to(torch.float32).expand(P.N).contiguous() if ctx.per_row else \
            (g_out.to(torch.float32) * ctx.scale).expand(P.N).contiguous()
        if P.labels is not None:
            rowf = torch.where(P.labels != P.opts.ignore_index, rowf, torch.zeros_like(rowf))
        dev = P.h_s.device
        d_h = torch.zeros(P.N, P.Ds, dtype=torch.float32, device=dev) if need_h else None
        d_w = torch.zeros(P.Vs, P.Ds, dtype=torch.float32, device=dev) if need_w else None
        d_b = torch.zeros(P.Vs, dtype=torch.float32, device=dev) if need_b else None
        cv = ctx.chunk_v or default_chunk(P.V, P.N, dev, buffers=1,
                                          budget=(256 << 20) if dev.type == "cuda" else (32 << 20))
        g = torch.empty(P.N, min(cv, P.V), dtype=P.h_s.dtype, device=dev)
        for c0 in range(0, P.V, g.shape[1]):
            width = min(g.shape[1], P.V - c0)
            gc = g[:, :width]
            fused.grad_chunk(P, stats, rowf, c0, width, gc)
            if d_h is not None:
                d_h += mm_f32(gc, P.w_s[c0:c0 + width])
            if d_w is not None:
                d_w[c0:c0 + width] = mm_f32(gc.t(), P.h_s)
            if d_b is not None:
                d_b[c0:c0 + width] = gc.float().sum(0)
        ctx.problem = ctx.stats = None  # one backward per forward
        return (d_h.to(P.h_s.dtype) if d_h is not None else None,
                d_w.to(P.w_s.dtype) if d_w is not None else None,
                d_b.to(P.b_s.dtype) if d_b is not None else None, None, None, None, None)
