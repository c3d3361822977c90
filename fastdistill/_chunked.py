"""Chunked "linear layer + row loss" with the gradient computed in the forward pass.

The engine of the custom ops fastdistill::linear_distill (mode="chunked": lm_head + divergence,
backends/linear_chunked.py), fastdistill::projected_feature (projection + feature loss) and the
linear top-k loss. For rows in chunks of ``chunk`` tokens:

    z = hidden[c] @ weight.T (+ bias)           float32, never rounded before the loss
    z = softcap * tanh(z / softcap)             optional (Gemma-style)
    rows[c], G = row_fn(c, z)                   the fused row kernel
    G *= 1 - tanh^2                             softcap chain rule
    grad_hidden[c] = G @ weight,  grad_weight += G.T @ hidden[c],  grad_bias += G.sum(0)

so at most one chunk of ``[chunk, out]`` float32 logits (and the row function's own chunk
buffers) exists at a time.

Two paths:

- float32 (every device; 16-bit weights on CPU are upcast once per sweep): G is written over
  z, and every product goes in place (torch.mm / addmm with out=): grad_weight accumulates in
  float32 with no temporary. On CPU a fresh buffer per chunk costs page faults comparable to
  the GEMM, so the buffers are allocated once per sweep.
- 16-bit weights on CUDA (the tensor cores): z comes from the matmul with a float32 output,
  the row kernel writes G in the weight dtype straight into a *ring* of ``ring`` rows (several
  chunks; the triton backend writes it directly, the others through a float32 G), and when the
  ring is full the two backward GEMMs run on all its rows at once: grad_hidden[ring] = G @ W
  (cuBLAS, written in the input dtype) and grad_weight += G.T @ hidden[ring], a GEMM with K =
  ring rows (the longer K, the fewer passes over the accumulator). With one ring for all rows,
  grad_weight is a single cuBLAS GEMM into the weight dtype (float32 accumulation inside it).
  With several, it accumulates in float32 without a float32 [V, D] buffer: bfloat16 weights
  keep the float32 sum as two 16-bit planes (the high half in grad_weight itself, the low half
  in an int16 [V, D] tensor) through the Triton GEMM of fastdistill/kernels/linear.py
  (mm_into), which rounds to bfloat16 on the last ring; float16 weights accumulate into a
  float32 buffer. :func:`plan_chunks` sizes chunk and ring from a memory budget.

With a scalar loss (mean / sum) the gradients are complete after the forward and backward only
multiplies them by grad_output. With ``reduction="none"`` each row has its own grad_output, so
the forward computes the losses only and backward recomputes the chunks with the per-row
factors folded in (one extra matmul per chunk, no extra memory): see ops.py.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

# (r0, r1, z [R, O] float32, need_grad, grad_scale[, grad_out]) -> (rows [R] float32,
# G [R, O] or None); G may be written over z, or into grad_out when the caller passes one
# (direct_grad=True in run_chunks).
RowFn = Callable[..., tuple]

_MM_OUT_DTYPE: Optional[str] = None   # "out" (with out=), "new" (without), "no"

# Extra memory the 16-bit CUDA path aims at by default (chunk and ring buffers, and the low
# plane of grad_weight when it accumulates over several rings), capped by half the free memory.
GPU_BUDGET = 7 << 28           # 1.75 GiB
# Every chunk re-reads both weight matrices in its four GEMMs (2 x 64 MiB at V = 65536,
# D = 256). jsd + CE at N = 4096 there, 2 cores: 2375 ms with 341-row chunks (256 MiB),
# 2265 ms with 512 rows, 2239 ms with 1024; 512 MiB gives 682 rows.
CPU_BUDGET = 512 << 20
MAX_CHUNK = 512                # float32 logit rows per step on the 16-bit CUDA path


# Devices whose 16-bit weights take the ring path (meta: fastdistill.bench.aot records its
# launches; the tests add "cpu" to run the path's logic on CPU tensors).
RING_DEVICES = ("cuda", "meta")


def tensor_core_path(weight: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> bool:
    """16-bit CUDA weights (and hidden of the same dtype): matmuls run in the weight dtype with
    float32 outputs. Elsewhere (CPU, float32) everything is float32."""
    return (weight.device.type in RING_DEVICES and
            weight.dtype in (torch.bfloat16, torch.float16) and
            (hidden is None or hidden.dtype == weight.dtype))


def _triton_gemm(device: torch.device) -> bool:
    from fastdistill import backends
    return device.type == "meta" or backends.check("triton", device)[0]


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b with a float32 result (written into `out` when given). 16-bit CUDA inputs use the
    tensor cores with a float32 output: torch.mm(..., out_dtype=float32) where torch has it,
    else the Triton GEMM (fastdistill/kernels/linear.py), else upcast copies."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    if a.device.type in ("cuda", "meta") and a.dtype == b.dtype and \
            a.dtype in (torch.bfloat16, torch.float16):
        if a.device.type == "meta":  # fastdistill.bench.aot: only the Triton launches matter
            return out if out is not None else torch.mm(a, b, out_dtype=torch.float32)
        if _MM_OUT_DTYPE is None:
            _MM_OUT_DTYPE = _probe_out_dtype(a)
        if _MM_OUT_DTYPE == "out":
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        if _MM_OUT_DTYPE == "new":
            z = torch.mm(a, b, out_dtype=torch.float32)
            return out.copy_(z) if out is not None else z
        if _triton_gemm(a.device):
            from fastdistill.kernels.linear import mm_into
            if out is None:
                out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
            return mm_into(a, b, out)
    z = torch.mm(a.float(), b.float())
    return out.copy_(z) if out is not None else z


def _probe_out_dtype(a: torch.Tensor) -> str:
    x = torch.ones(2, 2, dtype=a.dtype, device=a.device)
    try:
        torch.mm(x, x, out_dtype=torch.float32, out=torch.empty(2, 2, device=a.device))
        return "out"
    except (TypeError, RuntimeError):
        pass
    try:
        torch.mm(x, x, out_dtype=torch.float32)
        return "new"
    except (TypeError, RuntimeError):
        return "no"


def default_chunk(n_rows: int, width: int, device: torch.device, buffers: int = 3,
                  budget: Optional[int] = None) -> int:
    """Rows per chunk so that `buffers` float32 [chunk, width] tensors fit in the budget
    (512 MiB on GPU and on CPU)."""
    if budget is None:
        budget = (512 << 20) if device.type in ("cuda", "meta") else CPU_BUDGET
    rows = budget // max(1, buffers * 4 * width)
    return int(max(1, min(n_rows, rows)))


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """torch.empty; on CPU, big buffers are backed by transparent huge pages (madvise before
    the first touch, as the cpu backend's buffers): 4 KiB first-touch faults of the per-call
    chunk buffers otherwise cost a few percent of the GEMMs."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= (16 << 20):
        from fastdistill.backends import _ext
        if _ext._C is not None:
            _ext._C.advise_hugepages(out.data_ptr(), nbytes)
    return out


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _free_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on `device` (meta: an H200's)."""
    if device.type != "cuda":
        return 140 << 30
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_chunks(n_rows: int, width: int, weight: torch.Tensor, hidden: torch.Tensor,
                logit_buffers: int, chunk: Optional[int] = None, need_w: bool = True,
                budget: Optional[int] = None) -> Tuple[int, int]:
    """(chunk rows, ring rows) for run_chunks. `logit_buffers`: float32 [chunk, width] buffers
    alive per step (the student's logits, the teacher's, the softcap's tanh).

    CPU and float32: chunk from default_chunk, ring = chunk. 16-bit CUDA: within the budget
    (GPU_BUDGET, at most half the free memory), one ring for every row when it fits (grad_weight
    in a single GEMM), else the low plane (or float32 buffer) of grad_weight, chunks of at most
    MAX_CHUNK rows, and the longest ring the rest allows."""
    N = max(1, n_rows)
    if not tensor_core_path(weight, hidden):
        c = chunk or default_chunk(N, width, hidden.device, buffers=logit_buffers + 1,
                                   budget=budget)
        c = min(c, N)
        return c, c
    if budget is None:
        budget = min(GPU_BUDGET, _free_bytes(hidden.device) // 2)
    pitch = _round_up(width, 16)
    logit_row = 4 * pitch * logit_buffers
    ring_row = 2 * pitch
    c = min(N, chunk or MAX_CHUNK)
    if c * logit_row + N * ring_row <= budget:
        return c, _round_up(N, c)
    if not need_w:  # no grad_weight: the ring only batches the grad_hidden GEMM
        return c, max(c, (budget - c * logit_row) // ring_row // c * c)
    acc = weight.numel() * (2 if weight.dtype == torch.bfloat16 else 4)
    rest = max(budget - acc, 0)
    if chunk is None:
        c = min(N, MAX_CHUNK, max(64, int(rest * 0.4) // logit_row // 64 * 64))
    ring = max(c, (rest - c * logit_row) // ring_row // c * c)
    return c, min(ring, _round_up(N, c))


class _Ring:
    """The staged 16-bit logit gradient of up to `rows` rows and the backward GEMMs run on it
    (the 16-bit CUDA path of run_chunks)."""

    def __init__(self, hidden, weight, rows, n_rows, needs):
        self.h, self.w = hidden, weight
        V, D = weight.shape
        dev, dt = weight.device, weight.dtype
        pitch = _round_up(V, 16)  # 16-byte aligned rows for the GEMMs' vector loads
        self.buf = torch.empty(min(rows, n_rows), pitch, dtype=dt, device=dev)
        self.rows, self.start, self.fill = rows, 0, 0  # rows: a multiple of the chunk
        self.flushes = -(-n_rows // rows)
        self.done = 0
        self.g_h = torch.empty_like(hidden) if needs[0] else None
        self.g_w = self.lo = self.acc = None
        if needs[1]:
            self.g_w = torch.empty(V, D, dtype=dt, device=dev)
            if self.flushes > 1:
                if dt == torch.bfloat16 and _triton_gemm(dev):
                    self.lo = torch.empty(V, D, dtype=torch.int16, device=dev)
                else:
                    self.acc = torch.empty(V, D, dtype=torch.float32, device=dev)
        self.g_b = None

    def slot(self, n):
        """The ring rows for the next n logit rows ([n, V] view, row stride = pitch)."""
        s = self.buf[self.fill:self.fill + n, :self.w.shape[0]]
        self.fill += n
        return s

    def flush(self):
        """Backward GEMMs on the filled rows; they cover hidden rows [start, start + fill)."""
        if self.fill == 0:
            return
        r0, r1 = self.start, self.start + self.fill
        G = self.buf[:self.fill, :self.w.shape[0]]
        h = self.h[r0:r1]
        if self.g_h is not None:
            torch.mm(G, self.w, out=self.g_h[r0:r1])
        if self.g_w is not None:
            first, last = self.done == 0, self.done == self.flushes - 1
            if first and last:
                torch.mm(G.t(), h, out=self.g_w)
            elif self.lo is not None:
                from fastdistill.kernels import linear as K
                epi = K.EPI_SPLIT_FIRST if first else \
                    (K.EPI_SPLIT_LAST if last else K.EPI_SPLIT_ADD)
                K.mm_into(G.t(), h, self.g_w, epi, self.lo)
            elif _triton_gemm(G.device):
                from fastdistill.kernels import linear as K
                K.mm_into(G.t(), h, self.acc, K.EPI_STORE if first else K.EPI_ADD)
            else:  # no Triton: through a float32 temporary
                z = mm_f32(G.t(), h)
                self.acc.copy_(z) if first else self.acc.add_(z)
        if self.g_b is not None:
            self.g_b += G.sum(0, dtype=torch.float32)
        self.done += 1
        self.start, self.fill = r1, 0

    def result_w(self):
        if self.g_w is None:
            return None
        if self.acc is not None:
            return self.g_w.copy_(self.acc)
        return self.g_w


def run_chunks(hidden, weight, bias, row_fn, chunk, softcap, pre_scale, needs, scale,
               row_factor, ring_rows: Optional[int] = None, direct_grad: bool = False):
    """One sweep over the chunks: (rows [N] float32, [grad_hidden, grad_weight, grad_bias
    (float32)]) for the inputs in `needs` (None for the others); grad_weight is float32 on the
    float32 path and in the weight dtype on the 16-bit CUDA path. The logits are
    ``softcap(pre_scale * z)`` when a softcap is given (else z as it is); gradients are those of
    ``sum(scale * row_factor * rows)``. `ring_rows`: rows of the 16-bit ring (plan_chunks);
    `direct_grad`: row_fn accepts ``grad_out=`` and writes a 16-bit gradient into it."""
    N = hidden.shape[0]
    want = any(needs)
    dev = hidden.device
    rows_out = torch.empty(N, dtype=torch.float32, device=dev)
    tc = tensor_core_path(weight, hidden)
    chunk = max(1, min(chunk, N))
    w = weight if tc else weight.float()  # one float32 copy per sweep on the upcast path
    b = bias.float() if bias is not None else None
    V = weight.shape[0]
    zbuf = new_buffer((chunk, V), torch.float32, dev)
    thbuf = new_buffer((chunk, V), torch.float32, dev) if softcap is not None else None
    ring = None
    g_h = g_w = g_b = None
    if tc and want:
        ring = _Ring(hidden, weight, max(1, (ring_rows or chunk) // chunk) * chunk, N, needs)
        g_h = ring.g_h
    elif want:
        g_h = torch.empty_like(hidden) if needs[0] else None
        g_w = new_buffer(weight.shape, torch.float32, dev).zero_() if needs[1] else None
    if want and bias is not None and needs[2]:
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
    direct = direct_grad and ring is not None and row_factor is None and softcap is None
    if direct:  # the bias gradient from the staged 16-bit rows (no float32 G exists)
        ring.g_b = g_b
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        n = r1 - r0
        h = hidden[r0:r1] if tc else hidden[r0:r1].float()
        z = mm_f32(h, w.t(), out=zbuf[:n])
        if b is not None:
            z += b
        th = None
        if softcap is not None:
            if pre_scale != 1.0:
                z.mul_(pre_scale)
            th = torch.tanh(z.div_(softcap), out=thbuf[:n])
            z = torch.mul(th, softcap, out=z)
        if ring is not None and ring.fill + n > ring.rows:
            ring.flush()
        if direct:
            rows, _ = row_fn(r0, r1, z, want, scale, grad_out=ring.slot(n))
        else:
            rows, G = row_fn(r0, r1, z, want, scale)
        rows_out[r0:r1] = rows
        if not want:
            continue
        if not direct:
            if row_factor is not None:
                G.mul_(row_factor[r0:r1, None])
            if th is not None:
                G.mul_(th.mul_(th).neg_().add_(1.0).mul_(pre_scale) if pre_scale != 1.0
                       else th.mul_(th).neg_().add_(1.0))
        if ring is not None:
            if not direct:
                ring.slot(n).copy_(G)
                if g_b is not None:
                    g_b += G.sum(0)
            continue
        if g_h is not None:
            if g_h.dtype == torch.float32:
                torch.mm(G, w, out=g_h[r0:r1])
            else:
                g_h[r0:r1] = torch.mm(G, w)
        if g_w is not None:
            g_w.addmm_(G.t(), h)
        if g_b is not None:
            g_b += G.sum(0)
    if ring is not None:
        ring.flush()
        g_w = ring.result_w()
    return rows_out, [g_h, g_w, g_b]
