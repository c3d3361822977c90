"""Feature losses through a projection: tokens go through ``student @ W.T (+ b)`` in chunks
and straight into the fused feature kernel, so the projected features of all tokens never exist
at once. Gradients reach the student features and the projection (float32 accumulation)."""

from __future__ import annotations

import torch
from torch import nn

from fastdistill import _checks, ops
from fastdistill._chunked import default_chunk
from fastdistill._rows import reduction_scale
from fastdistill.reference import reference_feature_loss  # noqa: F401 (moved there)


def projection_params(projection, ds: int, dt: int, device: torch.device):
    """(weight [Dt, Ds], bias [Dt] or None) of a projection given as a tensor or nn.Linear."""
    if isinstance(projection, nn.Linear):
        weight, bias = projection.weight, projection.bias
    elif isinstance(projection, torch.Tensor):
        weight, bias = projection, None
    else:
        raise TypeError(f"projection must be a [Dt, Ds] tensor or an nn.Linear, got "
                        f"{type(projection).__name__}")
    if weight.dim() != 2 or tuple(weight.shape) != (dt, ds):
        raise ValueError(f"projection must have shape [Dt, Ds] = [{dt}, {ds}] (teacher width, "
                         f"student width), got {tuple(weight.shape)}")
    if weight.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"projection must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"projection is on {weight.device} but student is on {device}")
    return weight, bias


def projected_feature_loss(student, teacher, projection, kind: int, mask, reduction: str,
                           backend: str, chunk_size=None, coef: float = 1.0) -> torch.Tensor:
    """``coef * feature_loss(student, teacher, projection=...)`` with ``mask`` flattened to
    ``[N]``, through the custom op ``fastdistill::projected_feature``. ``coef`` is folded into
    the gradient scale (or, with reduction "none", multiplies the per-row losses, so backward
    passes coef * grad_output as the per-row factors) in float32: a 16-bit student gradient is
    rounded once."""
    lead = student.shape[:-1]
    ds, dt = student.shape[-1], teacher.shape[-1]
    weight, bias = projection_params(projection, ds, dt, student.device)
    s2, t2 = _checks.rows2d(student), _checks.rows2d(teacher)
    N = s2.shape[0]
    scale = reduction_scale(reduction, N, mask, student.device)
    if coef != 1.0 and reduction != "none":
        scale = scale * coef
    per_row = reduction == "none"
    chunk = chunk_size or default_chunk(N, max(ds, dt), student.device)
    on = torch.is_grad_enabled()
    loss, _, _, _ = ops.projected_feature(
        s2, weight, bias, t2, mask, scale, None, kind, per_row, backend, chunk,
        on and student.requires_grad, on and weight.requires_grad,
        on and bias is not None and bias.requires_grad)
    if not per_row:
        return loss
    return (loss * coef if coef != 1.0 else loss).reshape(lead)
