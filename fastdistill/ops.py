"""torch.library custom ops: one registration (schema, fake kernel, autograd) shared by every
backend, so ``torch.compile(fullgraph=True)`` traces through the losses.

``fastdistill::distill`` returns the reduced loss and the student gradient that the backend
computed in the forward pass (already multiplied by the reduction scale). In eager mode the
backward only multiplies that buffer by grad_output in place, and skips even that when
grad_output is exactly 1 (decided on the device for CUDA tensors: no host sync). The buffer is
consumed by the first backward: a second backward through the same forward (retain_graph=True)
raises autograd's "modified by an inplace operation" error rather than returning a twice-scaled
gradient. Under tracing (torch.compile, AOT autograd) the backward is the functional
``grad * grad_output`` instead, which the compiler is free to fuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdistill import backends
from fastdistill.config import KernelOptions


def _rows_view(factor: Tensor, like: Tensor) -> Tensor:
    """A 0-d factor as is, a per-row factor [N] as [N, 1, ...] to broadcast against `like`."""
    return factor if factor.dim() == 0 else factor.reshape(-1, *([1] * (like.dim() - 1)))


def scale_grad_(grad: Tensor, factor: Tensor) -> None:
    """Eager ``grad *= factor`` in place, skipped where factor == 1."""
    if grad.numel() == 0:
        return
    if grad.is_cuda:
        try:
            from fastdistill.kernels.scale import scale_rows_
        except ImportError:  # no triton: the CUDA kernel if built, else a plain multiply
            if backends.check("cuda", grad.device)[0] and grad.dim() == 2:
                from fastdistill.backends.cuda_backend import scale_rows_
                scale_rows_(grad, factor)
            else:
                grad.mul_(_rows_view(factor, grad))
        else:
            scale_rows_(grad, factor)
    elif not bool((factor == 1).all()):  # CPU: reading the value costs nothing
        grad.mul_(_rows_view(factor, grad))
    torch.autograd.graph.increment_version(grad)


def _apply_grad_output(grad: Tensor, g_out: Tensor) -> Tensor:
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():  # being traced
        return grad * _rows_view(g_out, grad).to(grad.dtype)
    scale_grad_(grad, g_out)
    return grad


def _need_grad_error():
    return RuntimeError("fastdistill: the forward ran without computing the student gradient "
                        "(grad mode was off or the student did not require grad)")


# ---- fastdistill::distill -----------------------------------------------------------------------

@torch.library.custom_op("fastdistill::distill", mutates_args=())
def distill(student: Tensor, teacher: Tensor, labels: Optional[Tensor], scale: Tensor,
            divergence: int, beta: float, s_mul: float, t_mul: float, h_mul: float,
            soft_scale: float, hard_weight: float, ignore_index: int, vocab: int, per_row: bool,
            backend: str, need_grad: bool) -> Tuple[Tensor, Tensor]:
    """Loss and student gradient for 2-D logits ``student [N, Vs]``, ``teacher [N, Vt]``; the
    scalars are those of ``fastdistill.config.KernelOptions``.

    Returns ``(loss, grad)``: loss is ``[N]`` float32 when ``per_row`` else
    ``scale * sum(rows)`` (0-d float32); grad is ``scale * d(loss)/d(student)`` in the
    student's dtype (``[N, Vs]``), or an empty tensor when ``need_grad`` is False.
    """
    opts = KernelOptions(divergence, beta, s_mul, t_mul, h_mul, soft_scale, hard_weight,
                         ignore_index)
    rows, grad = backends.get(backend).distill_forward(student, teacher, labels, opts, vocab,
                                                       scale, need_grad)
    loss = rows if per_row else rows.sum() * scale
    return loss, (grad if grad is not None else student.new_empty(0))


@distill.register_fake
def _(student, teacher, labels, scale, divergence, beta, s_mul, t_mul, h_mul, soft_scale,
      hard_weight, ignore_index, vocab, per_row, backend, need_grad):
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if need_grad else (0,))
    return loss, grad


def _distill_setup(ctx, inputs, output):
    ctx.need_grad = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    # no [N, V] zero tangent for the gradient output, which nothing differentiates
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _distill_backward(ctx, g_loss, g_grad):
    if not ctx.need_grad:
        raise _need_grad_error()
    (grad,) = ctx.saved_tensors
    return (_apply_grad_output(grad, g_loss),) + (None,) * 15


torch.library.register_autograd("fastdistill::distill", _distill_backward,
                                setup_context=_distill_setup)


# ---- fastdistill::feature -----------------------------------------------------------------------

@torch.library.custom_op("fastdistill::feature", mutates_args=())
def feature(student: Tensor, teacher: Tensor, mask: Optional[Tensor], scale: Tensor, kind: int,
            per_row: bool, backend: str, need_grad: bool) -> Tuple[Tensor, Tensor]:
    """Feature loss for 2-D ``student [N, D]`` and ``teacher [N, D]``; same conventions as
    ``distill`` (loss ``[N]`` or ``scale * sum``, gradient scaled by ``scale``)."""
    rows, grad = backends.get(backend).feature_forward(student, teacher, mask, kind, scale,
                                                       need_grad)
    loss = rows if per_row else rows.sum() * scale
    return loss, (grad if grad is not None else student.new_empty(0))


@feature.register_fake
def _(student, teacher, mask, scale, kind, per_row, backend, need_grad):
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=torch.float32)
    grad = student.new_empty(student.shape if need_grad else (0,))
    return loss, grad


def _feature_backward(ctx, g_loss, g_grad):
    if not ctx.need_grad:
        raise _need_grad_error()
    (grad,) = ctx.saved_tensors
    return (_apply_grad_output(grad, g_loss),) + (None,) * 7


torch.library.register_autograd("fastdistill::feature", _feature_backward,
                                setup_context=_distill_setup)


# ---- fastdistill::linear_distill --------------------------------------------------------------

@dataclass
class LinearCall:
    """The tensors and numbers of one linear_distill call, as the implementations of
    backends/linear_chunked.py and backends/linear_fused.py read them."""

    h_s: Tensor
    w_s: Tensor
    b_s: Optional[Tensor]
    h_t: Optional[Tensor]
    w_t: Optional[Tensor]
    b_t: Optional[Tensor]
    t_logits: Optional[Tensor]
    labels: Optional[Tensor]
    divergence: int
    beta: float
    inv_t: float
    soft_scale: float
    hard_weight: float
    ignore_index: int
    vocab: int
    s_scale: float
    t_scale: float
    s_cap: Optional[float]
    t_cap: Optional[float]
    backend: str


def _linear_impl(call: LinearCall, scale, row_factor, needs, mode, chunk_rows, chunk_vocab):
    if mode == "fused":
        from fastdistill.backends import linear_fused
        return linear_fused.forward(call, scale, row_factor, needs, chunk_vocab)
    from fastdistill.backends import linear_chunked
    return linear_chunked.forward(call, scale, row_factor, needs, chunk_rows)


@torch.library.custom_op("fastdistill::linear_distill", mutates_args=())
def linear_distill(h_s: Tensor, w_s: Tensor, b_s: Optional[Tensor], h_t: Optional[Tensor],
                   w_t: Optional[Tensor], b_t: Optional[Tensor], t_logits: Optional[Tensor],
                   labels: Optional[Tensor], scale: Tensor, row_factor: Optional[Tensor],
                   divergence: int, beta: float, inv_t: float, soft_scale: float,
                   hard_weight: float, ignore_index: int, vocab: int, s_scale: float,
                   t_scale: float, s_cap: Optional[float], t_cap: Optional[float],
                   per_row: bool, mode: str, backend: str, chunk_rows: int, chunk_vocab: int,
                   need_h: bool, need_w: bool, need_b: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss of ``h_s [N, Ds] @ w_s [Vs, Ds].T (+ b_s)`` against the teacher (``h_t @ w_t.T
    (+ b_t)`` or ``t_logits [N, Vt]``), with the gradients computed in the same call.

    Returns ``(loss, grad_h, grad_w, grad_b)``: loss ``[N]`` float32 when ``per_row`` else
    ``scale * sum(rows)``; the gradients are those of ``sum(scale * row_factor * rows)``
    (``row_factor`` [N] float32 or None), in the inputs' dtypes, or empty tensors where not
    asked for (need_*) or when ``per_row`` (backward then calls this op again with the per-row
    grad_output as ``row_factor``).
    """
    call = LinearCall(h_s, w_s, b_s, h_t, w_t, b_t, t_logits, labels, divergence, beta, inv_t,
                      soft_scale, hard_weight, ignore_index, vocab, s_scale, t_scale, s_cap,
                      t_cap, backend)
    needs = (need_h and not per_row, need_w and not per_row,
             need_b and b_s is not None and not per_row)
    rows, (g_h, g_w, g_b) = _linear_impl(call, scale, row_factor, needs, mode, chunk_rows,
                                         chunk_vocab)
    loss = rows if per_row else rows.sum() * scale
    return (loss, g_h.to(h_s.dtype) if g_h is not None else h_s.new_empty(0),
            g_w.to(w_s.dtype) if g_w is not None else h_s.new_empty(0),
            g_b.to(b_s.dtype) if g_b is not None else h_s.new_empty(0))


@linear_distill.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, t_logits, labels, scale, row_factor, divergence, beta,
      inv_t, soft_scale, hard_weight, ignore_index, vocab, s_scale, t_scale, s_cap, t_cap,
      per_row, mode, backend, chunk_rows, chunk_vocab, need_h, need_w, need_b):
    loss = h_s.new_empty((h_s.shape[0],) if per_row else (), dtype=torch.float32)
    want = not per_row
    return (loss, h_s.new_empty(h_s.shape) if need_h and want else h_s.new_empty(0),
            w_s.new_empty(w_s.shape) if need_w and want else h_s.new_empty(0),
            b_s.new_empty(b_s.shape) if need_b and want and b_s is not None
            else h_s.new_empty(0))


# ---- autograd of the ops whose forward computes the gradients of three inputs ------------------
# (fastdistill::linear_distill, fastdistill::projected_feature): outputs (loss, g_0, g_1, g_2)
# for the first three inputs; with per_row (reduction "none") the forward computes the losses
# only and backward calls the op again with the per-row grad_output as row_factor. Their schemas
# share a layout: n_tensors tensor inputs (the last two: scale, row_factor), then the options,
# of which `per_row` sits at index per_row_at and the three need flags come last.

def _register_forward_grad_autograd(op, n_tensors: int, per_row_at: int):
    def setup(ctx, inputs, output):
        ctx.opts = inputs[n_tensors:]
        ctx.per_row = ctx.opts[per_row_at]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        if ctx.per_row:  # backward recomputes with the per-row grad_output
            ctx.save_for_backward(*inputs[:n_tensors - 2])
        else:  # the gradients, already computed
            ctx.save_for_backward(*output[1:])

    def backward(ctx, g_loss, *unused):
        needs = ctx.needs_input_grad[:3]
        n_none = n_tensors - 3 + len(ctx.opts)
        if g_loss is None:
            return (None,) * (n_none + 3)
        if ctx.per_row:
            saved = ctx.saved_tensors
            opts = list(ctx.opts)
            opts[per_row_at] = False  # gradients, with the per-row factors folded in
            opts[-3:] = list(needs)
            one = torch.ones((), dtype=torch.float32, device=saved[0].device)
            _, *grads = op(*saved, one, g_loss.to(torch.float32).contiguous(), *opts)
        else:
            if not any(ctx.opts[-3:]):
                raise _need_grad_error()
            grads = [_apply_grad_output(g, g_loss) if g.numel() else g
                     for g in ctx.saved_tensors]
        return tuple(g if need and g.numel() else None for g, need in zip(grads, needs)) + \
            (None,) * n_none

    torch.library.register_autograd(op, backward, setup_context=setup)


_register_forward_grad_autograd(linear_distill, n_tensors=10, per_row_at=11)


# ---- fastdistill::projected_feature -------------------------------------------------------------

@torch.library.custom_op("fastdistill::projected_feature", mutates_args=())
def projected_feature(student: Tensor, weight: Tensor, bias: Optional[Tensor], teacher: Tensor,
                      mask: Optional[Tensor], scale: Tensor, row_factor: Optional[Tensor],
                      kind: int, per_row: bool, backend: str, chunk_rows: int, need_s: bool,
                      need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Feature loss of ``student [N, Ds] @ weight [Dt, Ds].T (+ bias)`` against ``teacher
    [N, Dt]`` (kind: the position in FEATURE_KINDS), tokens in chunks of ``chunk_rows``
    through the backend's fused feature kernel; the conventions of ``linear_distill``
    (gradients computed in the call, of ``sum(scale * row_factor * rows)``)."""
    from fastdistill._chunked import run_chunks
    impl = backends.get(backend)

    def row_fn(r0, r1, z, want, gs):
        m = mask[r0:r1] if mask is not None else None
        return impl.feature_forward(z, teacher[r0:r1], m, kind, gs, want)

    needs = (need_s and not per_row, need_w and not per_row,
             need_b and bias is not None and not per_row)
    rows, (g_s, g_w, g_b) = run_chunks(student, weight, bias, row_fn, chunk_rows, None, 1.0,
                                       needs, scale, row_factor)
    loss = rows if per_row else rows.sum() * scale
    return (loss, g_s.to(student.dtype) if g_s is not None else student.new_empty(0),
            g_w.to(weight.dtype) if g_w is not None else student.new_empty(0),
            g_b.to(bias.dtype) if g_b is not None else student.new_empty(0))


@projected_feature.register_fake
def _(student, weight, bias, teacher, mask, scale, row_factor, kind, per_row, backend,
      chunk_rows, need_s, need_w, need_b):
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=torch.float32)
    want = not per_row
    return (loss, student.new_empty(student.shape) if need_s and want else student.new_empty(0),
            weight.new_empty(weight.shape) if need_w and want else student.new_empty(0),
            bias.new_empty(bias.shape) if need_b and want and bias is not None
            else student.new_empty(0))


_register_forward_grad_autograd(projected_feature, n_tensors=7, per_row_at=1)
