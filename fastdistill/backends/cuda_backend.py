"""CUDA backend: the hand-written kernels of csrc/cuda/ through fastdistill._C.

Same contract as backends/torch_backend.py. The argument structs are built (and every tensor
checked) by backends/_ext.py. The kernels are enqueued on the current stream of the tensors'
device and read ``grad_scale`` on the device: nothing synchronises with the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdistill.backends import _ext
from fastdistill.backends import _cuda_arch
from fastdistill.config import KernelOptions


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _device(name: str, x) -> torch.device:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend runs on CUDA tensors, {name} is on {x.device}")
    _cuda_arch.require(x.device)  # once per device: does the binary hold code for this GPU?
    return x.device


def _scale(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.reshape(()).to(device=device, dtype=torch.float32).contiguous()


def _run(fn, args, what: str, device: torch.device) -> None:
    with torch.cuda.device(device):
        status = fn(args)
    if status != 0:
        _ext.check_status(status, what, _ext._C.cuda_last_error() if status == 3 else "")


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    opts: KernelOptions, vocab: int, grad_scale: torch.Tensor, need_grad: bool,
                    grad_out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    device = _device("student_logits", student)
    rows = torch.empty(student.shape[0], dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else \
            torch.empty_like(student, memory_format=torch.contiguous_format)
    args = _ext.distill_args(student, teacher, labels, grad, rows, _scale(grad_scale, device),
                             opts, vocab, stream=_stream(device))
    if student.shape[0]:
        _run(_ext._C.distill_cuda, args, "distill_cuda", device)
    return rows, grad


def feature_forward(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: int, grad_scale: torch.Tensor, need_grad: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    device = _device("student", student)
    rows = torch.empty(student.shape[0], dtype=torch.float32, device=device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
    args = _ext.feature_args(student, teacher, mask, grad, rows, _scale(grad_scale, device), kind,
                             stream=_stream(device))
    if student.shape[0]:
        _run(_ext._C.feature_cuda, args, "feature_cuda", device)
    return rows, grad


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad[r] *= factor[r]`` (factor [N]) or ``grad *= factor`` (0-d), in place on the
    device; rows whose factor is exactly 1 are not touched. grad: [N, W] with unit stride
    along W, or [N] (one column)."""
    device = _device("grad", grad)
    g2 = grad.unsqueeze(1) if grad.dim() == 1 else grad
    f = factor.to(device=device, dtype=torch.float32).contiguous()
    if g2.numel() == 0:
        return
    if g2.shape[1] > _ext.MAX_SCALE_COLS:
        g2.mul_(f.unsqueeze(1) if f.dim() else f)
        return
    _run(_ext._C.scale_rows_cuda, _ext.scale_args(g2, f, stream=_stream(device)),
         "scale_rows_cuda", device)


def topk_forward(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                 labels: Optional[torch.Tensor], opts: KernelOptions, tail: int, vocab: int,
                 grad_scale: torch.Tensor, need_grad: bool,
                 grad_out: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The contract of fastdistill.backends.torch_backend.topk_forward (csrc/cuda/topk_cuda.cu:
    one block per row, the row's bitmask in shared memory, a [N, K] float32 workspace)."""
    device = _device("student_logits", student)
    rows = torch.empty(student.shape[0], dtype=torch.float32, device=device)
    grad = work = None
    if need_grad:
        grad = grad_out if grad_out is not None else \
            torch.empty_like(student, memory_format=torch.contiguous_format)
        work = torch.empty(indices.shape, dtype=torch.float32, device=device)
    args = _ext.topk_args(student, indices, logprobs, labels, grad, rows,
                          _scale(grad_scale, device), work, opts, tail, vocab, cuda=True,
                          stream=_stream(device))
    if student.shape[0]:
        _run(_ext._C.topk_cuda, args, "topk_cuda", device)
    return rows, grad
