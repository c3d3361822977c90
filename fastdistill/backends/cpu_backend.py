"""Host backend: the OpenMP kernels of csrc/cpu/ through fastdistill._C.

Same contract as backends/torch_backend.py. Tensors must be on the CPU with unit stride along
the last dimension (the API layer guarantees it); the gradient buffer is row-contiguous.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdistill.backends import _ext
from fastdistill.divergences import DistillOptions


def _threads() -> int:
    return max(1, torch.get_num_threads())


HUGE_BUFFER = 64 << 20


def new_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `like`; big ones are backed by transparent huge pages
    (see advise_hugepages in csrc/bindings.cpp: 4 KiB first-touch faults otherwise cost about as
    much as the kernel)."""
    out = like.new_empty(like.shape)
    if out.numel() * out.element_size() >= HUGE_BUFFER:
        _ext._C.advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    opts: DistillOptions, vocab: int, grad_scale: torch.Tensor, need_grad: bool,
                    grad_out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, Vs = student.shape
    assert student.stride(1) == 1 and teacher.stride(1) == 1
    rows = torch.empty(N, dtype=torch.float32)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else new_buffer(student)
        assert grad.stride(1) == 1 and grad.dtype == student.dtype
    if labels is not None:
        labels = labels.contiguous()
    status = _ext._C.distill_cpu(
        student.data_ptr(), _ext.dtype_code(student), student.stride(0),
        teacher.data_ptr(), _ext.dtype_code(teacher), teacher.stride(0),
        labels.data_ptr() if labels is not None else 0,
        grad.data_ptr() if grad is not None else 0, grad.stride(0) if grad is not None else 0,
        Vs, rows.data_ptr(), N,
        opts.kernel_code, opts.beta, 1.0 / opts.temperature, opts.soft_scale, opts.hard_weight,
        opts.ignore_index, vocab, float(grad_scale), _threads())
    _ext.check_status(status, "distill_cpu")
    return rows, grad


def feature_forward(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: int, grad_scale: torch.Tensor, need_grad: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, D = student.shape
    assert student.stride(1) == 1 and teacher.stride(1) == 1
    rows = torch.empty(N, dtype=torch.float32)
    grad = new_buffer(student) if need_grad else None
    if mask is not None:
        mask = mask.contiguous()
    status = _ext._C.feature_cpu(
        student.data_ptr(), _ext.dtype_code(student), student.stride(0),
        teacher.data_ptr(), _ext.dtype_code(teacher), teacher.stride(0),
        mask.data_ptr() if mask is not None else 0,
        grad.data_ptr() if grad is not None else 0, grad.stride(0) if grad is not None else 0,
        rows.data_ptr(), N, D, kind, float(grad_scale), _threads())
    _ext.check_status(status, "feature_cpu")
    return rows, grad
