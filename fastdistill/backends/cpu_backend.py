"""Host backend: the OpenMP kernels of csrc/cpu/ through fastdistill._C.

Same contract as backends/torch_backend.py. The argument structs are built (and every tensor
checked) by backends/_ext.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdistill.backends import _ext
from fastdistill.config import KernelOptions

HUGE_BUFFER = 64 << 20


def _threads() -> int:
    return max(1, torch.get_num_threads())


def new_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised row-contiguous tensor shaped like `like`; big ones are backed by
    transparent huge pages (see advise_hugepages in csrc/bindings.cpp: 4 KiB first-touch faults
    otherwise cost about as much as the kernel)."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.numel() * out.element_size() >= HUGE_BUFFER:
        _ext._C.advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


def _scale(grad_scale: torch.Tensor) -> torch.Tensor:
    return grad_scale.reshape(()).to(dtype=torch.float32).contiguous()


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    opts: KernelOptions, vocab: int, grad_scale: torch.Tensor, need_grad: bool,
                    grad_out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N = student.shape[0]
    rows = torch.empty(N, dtype=torch.float32)
    grad = (grad_out if grad_out is not None else new_buffer(student)) if need_grad else None
    scale = _scale(grad_scale)
    args = _ext.distill_args(student, teacher, labels, grad, rows, scale, opts, vocab,
                             threads=_threads())
    _ext.check_status(_ext._C.distill_cpu(args), "distill_cpu")
    return rows, grad


def feature_forward(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: int, grad_scale: torch.Tensor, need_grad: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    rows = torch.empty(student.shape[0], dtype=torch.float32)
    grad = new_buffer(student) if need_grad else None
    scale = _scale(grad_scale)
    args = _ext.feature_args(student, teacher, mask, grad, rows, scale, kind, threads=_threads())
    _ext.check_status(_ext._C.feature_cpu(args), "feature_cpu")
    return rows, grad


def topk_forward(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                 labels: Optional[torch.Tensor], opts: KernelOptions, tail: int, vocab: int,
                 grad_scale: torch.Tensor, need_grad: bool,
                 grad_out: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The contract of fastdistill.backends.torch_backend.topk_forward."""
    rows = torch.empty(student.shape[0], dtype=torch.float32)
    grad = (grad_out if grad_out is not None else new_buffer(student)) if need_grad else None
    args = _ext.topk_args(student, indices, logprobs, labels, grad, rows, _scale(grad_scale),
                          None, opts, tail, vocab, threads=_threads())
    _ext.check_status(_ext._C.topk_cpu(args), "topk_cpu")
    return rows, grad
