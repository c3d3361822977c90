"""Feature losses through a projection: tokens go through ``student @ W.T (+ b)`` in chunks
and straight into the fused feature kernel, so the projected features of all tokens never exist
at once. Gradients reach the student features and the projection (float32 accumulation)."""

from __future__ import annotations

import torch
from torch import nn

from fastdistill import _checks, backends
from fastdistill._chunked import chunked_linear_loss, default_chunk
from fastdistill._reduction import reduction_scale


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
    ``[N]``. ``coef`` is folded into the gradient scale (or the per-row factors) in float32,
    so a 16-bit student gradient is rounded once."""
    lead = student.shape[:-1]
    ds, dt = student.shape[-1], teacher.shape[-1]
    weight, bias = projection_params(projection, ds, dt, student.device)
    s2, t2 = _checks.rows2d(student), _checks.rows2d(teacher)
    N = s2.shape[0]
    valid = mask.sum() if mask is not None else None
    scale = reduction_scale(reduction, N, valid, None, student.device)
    if coef != 1.0 and reduction != "none":
        scale = scale * coef
    impl = backends.get(backend)

    def row_fn(r0, r1, z, need_grad, grad_scale):
        m = mask[r0:r1] if mask is not None else None
        return impl.feature_forward(z, t2[r0:r1], m, kind, grad_scale, need_grad)

    chunk = chunk_size or default_chunk(N, max(ds, dt), student.device)
    per_row = reduction == "none"
    loss = chunked_linear_loss(s2, weight, bias, row_fn, chunk, None, per_row, scale)
    if not per_row:
        return loss
    # backward passes coef * grad_output as the per-row factors (applied in float32)
    return (loss * coef if coef != 1.0 else loss).reshape(lead)


def reference_feature_loss(student, teacher, kind="mse", mask=None, projection=None,
                           reduction="mean") -> torch.Tensor:
    """``feature_loss`` in float64 with plain PyTorch (differentiable); the tests' oracle."""
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    if projection is not None:
        w, b = (projection.weight, projection.bias) if isinstance(projection, nn.Linear) \
            else (projection, None)
        s = s @ w.to(torch.float64).t()
        if b is not None:
            s = s + b.to(torch.float64)
    if kind == "mse":
        rows = ((s - t) ** 2).mean(-1)
    elif kind == "cosine":
        ns = s.norm(dim=-1).clamp_min(1e-8)
        nt = t.norm(dim=-1).clamp_min(1e-8)
        rows = 1 - (s * t).sum(-1) / (ns * nt)
    elif kind == "normalized_mse":
        D = s.shape[-1]
        rows = ((torch.nn.functional.layer_norm(s, (D,), eps=1e-5)
                 - torch.nn.functional.layer_norm(t, (D,), eps=1e-5)) ** 2).mean(-1)
    else:
        raise ValueError(kind)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if mask is None else int(mask.sum())
    return rows.sum() / max(n, 1)
