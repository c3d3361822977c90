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

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdistill import backends
from fastdistill.divergences import DistillOptions


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
            divergence: str, beta: float, temperature: float, t2_scale: bool, hard_weight: float,
            soft_weight: float, ignore_index: int, vocab: int, per_row: bool, backend: str,
            need_grad: bool) -> Tuple[Tensor, Tensor]:
    """Loss and student gradient for 2-D logits ``student [N, Vs]``, ``teacher [N, Vt]``.

    Returns ``(loss, grad)``: loss is ``[N]`` float32 when ``per_row`` else
    ``scale * sum(rows)`` (0-d float32); grad is ``scale * d(loss)/d(student)`` in the
    student's dtype (``[N, Vs]``), or an empty tensor when ``need_grad`` is False.
    """
    opts = DistillOptions(divergence, beta, temperature, t2_scale, hard_weight, soft_weight,
                          ignore_index, "none" if per_row else "sum")
    rows, grad = backends.get(backend).distill_forward(student, teacher, labels, opts, vocab,
                                                       scale, need_grad)
    loss = rows if per_row else rows.sum() * scale
    return loss, (grad if grad is not None else student.new_empty(0))


@distill.register_fake
def _(student, teacher, labels, scale, divergence, beta, temperature, t2_scale, hard_weight,
      soft_weight, ignore_index, vocab, per_row, backend, need_grad):
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
    return (_apply_grad_output(grad, g_loss),) + (None,) * 14


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
