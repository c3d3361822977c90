"""linear_distill_loss, mode="chunked" (every backend).

Rows go in chunks; per chunk the student and teacher logits come from the matmul in float32
(never rounded to 16 bits before the softmax), the logit-level kernel of the chosen backend
turns them into the row losses and the logit gradient (in place on the float32 path; straight
into the 16-bit ring of fastdistill/_chunked.py on CUDA with the triton backend), and that
gradient flows into grad_hidden, grad_weight (float32 accumulation) and grad_bias
(fastdistill/_chunked.py: run_chunks). Extra memory: the chunk and ring buffers of plan_chunks
(O(chunk x V)), and for several rings the low plane of grad_weight (V x D x 2 bytes).
"""

from __future__ import annotations

import torch

from fastdistill import backends
from fastdistill._chunked import (mm_f32, new_buffer, plan_chunks, run_chunks,
                                  tensor_core_path)
from fastdistill.config import KernelOptions


def kernel_options(call) -> KernelOptions:
    """Logit scales are folded into the row kernel's multipliers, except on a side with a
    softcap: there the chunk's logits are scaled and capped first (scale, then cap, then 1/T)."""
    s_scale = 1.0 if call.s_cap is not None else call.s_scale
    t_scale = 1.0 if call.t_cap is not None else call.t_scale
    return KernelOptions(call.divergence, call.beta, s_scale * call.inv_t, t_scale * call.inv_t,
                         s_scale, call.soft_scale, call.hard_weight, call.ignore_index)


def forward(call, grad_scale: torch.Tensor, row_factor, needs, chunk_rows: int):
    """(rows [N] float32, [grad_hidden, grad_weight, grad_bias]) for one sweep over the
    chunks; gradients are those of sum(grad_scale * row_factor * rows)."""
    impl = backends.get(call.backend)
    opts = kernel_options(call)
    N, device = call.h_s.shape[0], call.h_s.device
    vt = call.w_t.shape[0] if call.t_logits is None else call.t_logits.shape[1]
    buffers = 2 + (call.s_cap is not None)  # student and teacher logits (+ the softcap's tanh)
    chunk, ring = plan_chunks(N, max(call.w_s.shape[0], vt), call.w_s, call.h_s, buffers,
                              chunk=chunk_rows or None, need_w=needs[1])
    t_w = t_buf = None
    if call.t_logits is None:
        # 16-bit CUDA teacher weights stay as they are (float32 outputs); elsewhere one float32
        # copy per sweep
        t_w = call.w_t if tensor_core_path(call.w_t, call.h_t) else call.w_t.float()
        t_buf = new_buffer((min(chunk, N), vt), torch.float32, device)

    def teacher_chunk(r0, r1):
        with torch.no_grad():
            if call.t_logits is not None:
                if call.t_cap is None:
                    return call.t_logits[r0:r1]
                z = call.t_logits[r0:r1].to(torch.float32, copy=True)  # the input stays as is
            else:
                h = call.h_t[r0:r1] if t_w.dtype == call.h_t.dtype else call.h_t[r0:r1].float()
                z = mm_f32(h, t_w.t(), out=t_buf[:r1 - r0])
                if call.b_t is not None:
                    z += call.b_t.float()
            if call.t_cap is not None:
                if call.t_scale != 1.0:
                    z.mul_(call.t_scale)
                z = torch.tanh(z.div_(call.t_cap), out=z).mul_(call.t_cap)
        return z

    def row_fn(r0, r1, z, need_grad, scale, grad_out=None):
        lab = call.labels[r0:r1] if call.labels is not None else None
        return impl.distill_forward(z, teacher_chunk(r0, r1), lab, opts, call.vocab, scale,
                                    need_grad, grad_out=z if grad_out is None else grad_out)

    s_scale = call.s_scale if call.s_cap is not None else 1.0
    return run_chunks(call.h_s, call.w_s, call.b_s, row_fn, chunk, call.s_cap, s_scale, needs,
                      grad_scale, row_factor, ring_rows=ring,
                      direct_grad=call.backend == "triton")
