"""linear_distill_loss, mode="fused" (Triton): no logits in memory (fastdistill/kernels/linear.py).

The forward computes per-row online statistics from logit tiles made on chip; the gradient is
recomputed tile by tile from them and staged one vocabulary chunk at a time ([rows, chunk] in the
weight dtype) into two GEMMs that give grad_hidden (float32 accumulation) and that chunk's
grad_weight. Extra memory: O(N x chunk), independent of V.
"""

from __future__ import annotations

import torch

from fastdistill._chunked import default_chunk, mm_f32
from fastdistill.config import KernelOptions


def forward(call, grad_scale: torch.Tensor, row_factor, needs, chunk_vocab: int):
    """(rows [N] float32, [grad_hidden, grad_weight, grad_bias]) with the gradients of
    sum(grad_scale * row_factor * rows) for the inputs in `needs`."""
    from fastdistill.kernels import linear as fused
    opts = KernelOptions(call.divergence, call.beta, call.inv_t, call.inv_t, 1.0,
                         call.soft_scale, call.hard_weight, call.ignore_index)
    P = fused._Problem(call.h_s, call.w_s, call.b_s, call.h_t, call.w_t, call.b_t,
                       call.t_logits, call.labels, opts, call.vocab, call.s_cap, call.t_cap,
                       call.s_scale, call.t_scale)
    stats, rows = fused.forward_stats(P)
    if not any(needs):
        return rows, [None, None, None]
    dev = P.h_s.device
    rowf = grad_scale.to(torch.float32).expand(P.N)
    if row_factor is not None:
        rowf = rowf * row_factor
    rowf = rowf.contiguous()
    if P.labels is not None:
        rowf = torch.where(P.labels != call.ignore_index, rowf, torch.zeros_like(rowf))
    need_h, need_w, need_b = needs
    d_h = torch.zeros(P.N, P.Ds, dtype=torch.float32, device=dev) if need_h else None
    d_w = torch.zeros(P.Vs, P.Ds, dtype=torch.float32, device=dev) if need_w else None
    d_b = torch.zeros(P.Vs, dtype=torch.float32, device=dev) \
        if need_b and call.b_s is not None else None
    cv = chunk_vocab or default_chunk(P.V, P.N, dev, buffers=1,
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
    return rows, [d_h, d_w, d_b]
