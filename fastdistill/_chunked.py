"""Chunked "linear layer + row loss" with the gradient computed in the forward pass.

The engine of the custom ops fastdistill::linear_distill (mode="chunked": lm_head + divergence,
backends/linear_chunked.py) and fastdistill::projected_feature (projection + feature loss). For
rows in chunks of ``chunk`` tokens:

    z = hidden[c] @ weight.T (+ bias)           float32, never rounded before the loss
    z = softcap * tanh(z / softcap)             optional (Gemma-style)
    rows[c], G = row_fn(c, z)                   the fused row kernel, G written over z
    G *= 1 - tanh^2                             softcap chain rule
    grad_hidden[c] = G @ weight,  grad_weight += G.T @ hidden[c],  grad_bias += G.sum(0)

so at most one chunk of ``[chunk, out]`` float32 logits (and the row function's own chunk
buffers) exists at a time. grad_weight and grad_bias accumulate in float32. On the float32
path the chunk buffers are allocated once and every product is written in place (torch.mm /
addmm with out=): on CPU a fresh buffer per chunk costs page faults comparable to the GEMM.

With a scalar loss (mean / sum) the gradients are complete after the forward and backward only
multiplies them by grad_output. With ``reduction="none"`` each row has its own grad_output, so
the forward computes the losses only and backward recomputes the chunks with the per-row
factors folded in (one extra matmul per chunk, no extra memory): see ops.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# (r0, r1, z [R, O] float32, need_grad, grad_scale) -> (rows [R] float32, G [R, O] or None);
# G may be written over z.
RowFn = Callable[[int, int, torch.Tensor, bool, torch.Tensor], tuple]

_MM_OUT_DTYPE: Optional[bool] = None


def tensor_core_path(weight: torch.Tensor) -> bool:
    """16-bit CUDA weights: matmuls run in the weight dtype with float32 outputs. Elsewhere
    (CPU, float32) everything is float32."""
    return weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b with a float32 result (written into `out` on the float32 path when given). 16-bit
    CUDA inputs use the tensor cores with float32 output (torch.mm(..., out_dtype=float32))
    where torch has it; elsewhere the inputs are upcast."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        if _MM_OUT_DTYPE is None:
            try:
                torch.mm(a[:1], b[:, :1], out_dtype=torch.float32)
                _MM_OUT_DTYPE = True
            except (TypeError, RuntimeError):
                _MM_OUT_DTYPE = False
        if _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def default_chunk(n_rows: int, width: int, device: torch.device, buffers: int = 3,
                  budget: Optional[int] = None) -> int:
    """Rows per chunk so that `buffers` float32 [chunk, width] tensors fit in the budget
    (512 MiB on GPU, 256 MiB on CPU: chunks of a few hundred rows keep the GEMMs efficient,
    and stay a few percent of the naive loss's memory)."""
    if budget is None:
        budget = (512 << 20) if device.type == "cuda" else (256 << 20)
    rows = budget // max(1, buffers * 4 * width)
    return int(max(1, min(n_rows, rows)))


def run_chunks(hidden, weight, bias, row_fn, chunk, softcap, pre_scale, needs, scale,
               row_factor):
    """One sweep over the chunks: (rows [N] float32, [grad_hidden, grad_weight (float32),
    grad_bias (float32)]) for the inputs in `needs` (None for the others). The logits are
    ``softcap(pre_scale * z)`` when a softcap is given (else z as it is); gradients are those of
    ``sum(scale * row_factor * rows)``."""
    N = hidden.shape[0]
    want = any(needs)
    rows_out = torch.empty(N, dtype=torch.float32, device=hidden.device)
    g_h = torch.empty_like(hidden) if needs[0] else None
    g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] \
        else None
    g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
        if bias is not None and needs[2] else None
    tc = tensor_core_path(weight)
    w = weight if tc else weight.float()  # one float32 copy per sweep on the upcast path
    b = bias.float() if bias is not None else None
    zbuf = None if tc else torch.empty(min(chunk, N), weight.shape[0], dtype=torch.float32,
                                       device=weight.device)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        h = hidden[r0:r1] if tc else hidden[r0:r1].float()
        z = mm_f32(h, w.t(), out=zbuf[:r1 - r0] if zbuf is not None else None)
        if b is not None:
            z += b
        th = None
        if softcap is not None:
            if pre_scale != 1.0:
                z.mul_(pre_scale)
            th = torch.tanh(z.div_(softcap))
            z = torch.mul(th, softcap, out=z)
        rows, G = row_fn(r0, r1, z, want, scale)
        rows_out[r0:r1] = rows
        if not want:
            continue
        if row_factor is not None:
            G.mul_(row_factor[r0:r1, None])
        if th is not None:
            G.mul_((1.0 - th * th) * pre_scale if pre_scale != 1.0 else 1.0 - th * th)
        if tc:
            Gm = G.to(w.dtype)
            if g_h is not None:
                g_h[r0:r1] = torch.mm(Gm, w)
            if g_w is not None:
                g_w += mm_f32(Gm.t(), h)
        else:
            if g_h is not None:
                if g_h.dtype == torch.float32:
                    torch.mm(G, w, out=g_h[r0:r1])
                else:
                    g_h[r0:r1] = torch.mm(G, w)
            if g_w is not None:
                g_w.addmm_(G.t(), h)
        if g_b is not None:
            g_b += G.sum(0)
    return rows_out, [g_h, g_w, g_b]
