"""The fused temperature-softmax + top-k of a teacher's logits: ``topk_logprobs``.

For logits ``[..., V]`` it returns the K largest log-probabilities of softmax(logits / T) and
their indices, best first, without a probability tensor:

- CUDA tensors (Triton): one program per row streams the logits once, with the online
  log-sum-exp of z / T and a running top-K of packed (value, column) keys (fastdistill/kernels/
  topk.py: topk_extract_kernel); ties go to the smaller index.
- CPU tensors: rows in chunks of at most 32 MiB of float32 logits; per chunk ``torch.topk`` (a
  selection, O(V) per row, no sort of the row) and ``torch.logsumexp`` of z / T. The chunk is
  the only float32 temporary, so memory stays bounded whatever N and V are; a hand-written host
  kernel would save one read of a chunk that is already in cache, and extraction is dominated by
  the teacher's forward pass.
"""

from __future__ import annotations

from typing import Tuple

import torch

CPU_CHUNK_BYTES = 32 << 20


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0, *,
                  backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices [..., k] int32, logprobs [..., k] float32): the top-k of
    log_softmax(logits / temperature) along the last dimension, best first.

    ``backend``: "auto" (CUDA tensors: triton when installed, else torch; CPU tensors: torch),
    "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or "torch" (chunked)."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (torch.float32, torch.float16,
                                                                    torch.bfloat16):
        raise TypeError("logits must be a float32, float16 or bfloat16 torch.Tensor")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, {V}] (the vocabulary size), got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if logits.is_cuda and _triton_ok() else "torch"
    lead = logits.shape[:-1]
    z = logits.reshape(-1, V)
    if z.shape[0] and z.stride(-1) != 1:
        z = z.contiguous()
    if backend == "triton":
        from fastdistill import backends
        ok, why = backends.check("triton", z.device)
        if not ok:
            raise backends.BackendUnavailableError(f"backend='triton' is unavailable: {why}")
        from fastdistill.kernels.topk import extract_topk_rows
        idx, lp = extract_topk_rows(z, k, float(temperature))
    else:
        idx, lp = _chunked(z, k, float(temperature))
    return idx.reshape(*lead, k), lp.reshape(*lead, k)


def _chunked(z: torch.Tensor, k: int, T: float):
    N, V = z.shape
    idx = torch.empty(N, k, dtype=torch.int32, device=z.device)
    lp = torch.empty(N, k, dtype=torch.float32, device=z.device)
    step = max(1, CPU_CHUNK_BYTES // (4 * V))
    for r0 in range(0, N, step):
        x = z[r0:r0 + step].float()
        if T != 1.0:
            x = x / T
        lse = torch.logsumexp(x, -1, keepdim=True)
        v, i = x.topk(k, -1)
        idx[r0:r0 + step] = i
        lp[r0:r0 + step] = v - lse
    return idx, lp


def _triton_ok() -> bool:
    try:
        import fastdistill.kernels.topk  # noqa: F401 (triton installed and the kernels load)
        return True
    except ImportError:
        return False
