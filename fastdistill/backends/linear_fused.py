"""linear_distill_loss, mode="fused" (Triton): no logits in memory (fastdistill/kernels/linear.py).

The forward computes per-row online statistics from logit tiles made on chip; the gradient is
recomputed tile by tile from them and staged one vocabulary chunk at a time ([rows, chunk] in the
weight dtype) into two GEMMs that give grad_hidden (float32 accumulation) and that chunk's
grad_weight. Extra memory: O(N x chunk), independent of V.
"""

from __future__ import annotations

import torch

from fastdistill._chunked import mm_f32
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
    V, N, Ds = P.V, P.N, P.Ds
    cv = min(chunk_vocab or vocab_chunk(N, Ds, V, dev), V)
    n_chunks = -(-V // cv)
    h_dt, w_dt, b_dt = P.out_dtypes
    g = torch.empty(N, cv, dtype=P.h_s.dtype, device=dev)
    dh = _GradHidden(N, Ds, h_dt, dev, n_chunks) if need_h else None
    d_w = torch.empty(P.Vs, Ds, dtype=w_dt, device=dev) if need_w else None
    if d_w is not None and P.Vs > V:
        d_w[V:].zero_()  # padding rows of the vocabulary: no gradient
    d_b = torch.zeros(P.Vs, dtype=torch.float32, device=dev) \
        if need_b and call.b_s is not None else None
    for c0 in range(0, V, cv):
        width = min(cv, V - c0)
        gc = g[:, :width]
        fused.grad_chunk(P, stats, rowf, c0, width, gc)
        if dh is not None:
            dh.add(gc, P.w_s[c0:c0 + width])
        if d_w is not None:
            # one GEMM per vocabulary chunk over every row: complete, written in the weight
            # dtype (float32 accumulation inside the GEMM)
            _mm_to(gc.t(), P.h_s, d_w[c0:c0 + width])
        if d_b is not None:
            d_b[c0:c0 + width] = gc.sum(0, dtype=torch.float32)
    return rows, [dh.result() if dh is not None else None, d_w, d_b]


def vocab_chunk(N: int, Ds: int, V: int, device) -> int:
    """Vocabulary columns per backward chunk: the staged [N, chunk] gradient (16-bit) and the
    low plane of grad_hidden (N x Ds x 2 bytes) within FUSED_BUDGET, a multiple of 128."""
    e = 2 if device.type in ("cuda", "meta") else 4
    room = FUSED_BUDGET - N * Ds * 2
    cols = max(128, room // max(1, N * e) // 128 * 128)
    return int(min(cols, V)) if device.type in ("cuda", "meta") else int(min(V, max(16, cols)))


# Extra memory of the backward beyond the gradients: the staged chunk and grad_hidden's low
# plane (the statistics, [N, 8] float32, and the forward's split states are small)
FUSED_BUDGET = 224 << 20


def _mm_to(a, b, out):
    """out = a @ b in out's dtype (float32 accumulation)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(mm_f32(a, b))


class _GradHidden:
    """grad_hidden = sum over vocabulary chunks of G_c @ W_c, accumulated in float32: bfloat16
    (CUDA) as two 16-bit planes through the Triton GEMM (the high plane is the result), float16
    into a float32 buffer, float32 in place."""

    def __init__(self, N, D, dtype, device, n_chunks):
        self.n, self.i = n_chunks, 0
        self.out = torch.empty(N, D, dtype=dtype, device=device)
        self.lo = self.acc = None
        if dtype == torch.float32:
            self.out.zero_()
        elif dtype == torch.bfloat16 and n_chunks > 1:
            self.lo = torch.empty(N, D, dtype=torch.int16, device=device)
        elif n_chunks > 1:
            self.acc = torch.zeros(N, D, dtype=torch.float32, device=device)

    def add(self, gc, w):
        from fastdistill.kernels import linear as K
        first, last = self.i == 0, self.i == self.n - 1
        self.i += 1
        if self.out.dtype == torch.float32:
            if gc.dtype == torch.float32:
                self.out.addmm_(gc, w.float() if w.dtype != torch.float32 else w)
            else:
                K.mm_into(gc, w, self.out, K.EPI_ADD)
        elif first and last:
            _mm_to(gc, w, self.out)
        elif self.lo is not None:
            K.mm_into(gc, w, self.out, K.EPI_SPLIT_FIRST if first else
                      (K.EPI_SPLIT_LAST if last else K.EPI_SPLIT_ADD), self.lo)
        else:
            K.mm_into(gc, w, self.acc, K.EPI_ADD)

    def result(self):
        return self.out.copy_(self.acc) if self.acc is not None else self.out
