"""CUDA backend: the hand-written kernels of csrc/cuda/ through fastdistill._C.

Same contract as backends/torch_backend.py. Tensors must be CUDA tensors of one device with unit
stride along the last dimension (the API layer guarantees it; this module checks it again,
because a raw pointer crosses into C++ here). The kernels are enqueued on the current stream of
that device and read ``grad_scale`` on the device: nothing synchronises with the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdistill.backends import _ext
from fastdistill.backends import _cuda_arch
from fastdistill.divergences import DistillOptions

# csrc/cuda/common.cuh: one block per row (grid.x), int column indices within a row
MAX_ROWS = 2 ** 31 - 1
MAX_COLS = 2 ** 31 - 1 - 2 ** 20
# csrc/cuda/scale_cuda.cu: grid.y counts blocks of 256 x 4 columns
MAX_SCALE_COLS = 65535 * 256 * 4


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _rows(name: str, x, device: torch.device, *, dtype=None) -> None:
    """x is a 2-D tensor on `device`, float (or `dtype`), unit stride along its rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the cuda backend needs "
                         "every tensor on the same CUDA device)")
    if dtype is None:
        _ext.dtype_code(x)  # float32 / float16 / bfloat16, else TypeError
    elif x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, columns], got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides "
                         f"{tuple(x.stride())}")
    if x.shape[0] > MAX_ROWS or x.shape[1] > MAX_COLS:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; the cuda backend takes at most "
                         f"{MAX_ROWS} rows of at most {MAX_COLS} columns")


def _vector(name: str, x, device: torch.device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous [n] tensor of `dtype` on `device`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    return x.contiguous()


def _scalar(name: str, x, device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor on `device` (its pointer is read by the kernel)."""
    if not isinstance(x, torch.Tensor) or x.numel() != 1:
        raise TypeError(f"{name} must be a one-element tensor, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    return x.reshape(()).to(device=device, dtype=torch.float32).contiguous()


def _output_rows(name: str, x, like: torch.Tensor) -> None:
    """A gradient buffer: shape and dtype of `like`, rows that do not overlap."""
    _rows(name, x, like.device, dtype=like.dtype)
    if x.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.shape[0] > 1 and x.stride(0) < x.shape[1]:
        raise ValueError(f"{name} has overlapping rows (strides {tuple(x.stride())})")


def _device_of(name: str, x) -> torch.device:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend runs on CUDA tensors, {name} is on {x.device}")
    _cuda_arch.require(x.device)  # once per device: does the binary hold code for this GPU?
    return x.device


def _check(status: int, what: str) -> None:
    if status != 0:
        _ext.check_status(status, what, _ext._C.cuda_last_error() if status == 3 else "")


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    opts: DistillOptions, vocab: int, grad_scale: torch.Tensor, need_grad: bool,
                    grad_out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    device = _device_of("student_logits", student)
    _rows("student_logits", student, device)
    _rows("teacher_logits", teacher, device)
    N, Vs = student.shape
    if teacher.shape[0] != N:
        raise ValueError(f"teacher_logits has {teacher.shape[0]} rows, student_logits {N}")
    if not 1 <= vocab <= min(Vs, teacher.shape[1]):
        raise ValueError(f"vocab must be in [1, {min(Vs, teacher.shape[1])}], got {vocab}")
    if labels is not None:
        labels = _vector("labels", labels, device, N, torch.int64)
    gs = _scalar("grad_scale", grad_scale, device)
    rows = torch.empty(N, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        if grad_out is not None:
            _output_rows("grad_out", grad_out, student)
            grad = grad_out
        else:
            grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if N == 0:
        return rows, grad
    with torch.cuda.device(device):
        status = _ext._C.distill_cuda(
            student.data_ptr(), _ext.dtype_code(student), student.stride(0),
            teacher.data_ptr(), _ext.dtype_code(teacher), teacher.stride(0),
            labels.data_ptr() if labels is not None else 0,
            grad.data_ptr() if grad is not None else 0, grad.stride(0) if grad is not None else 0,
            Vs, rows.data_ptr(), N,
            opts.kernel_code, opts.beta, 1.0 / opts.temperature, opts.soft_scale,
            opts.hard_weight, opts.ignore_index, vocab, gs.data_ptr(), _stream(device))
    _check(status, "distill_cuda")
    return rows, grad


def feature_forward(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: int, grad_scale: torch.Tensor, need_grad: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    device = _device_of("student", student)
    _rows("student", student, device)
    _rows("teacher", teacher, device)
    N, D = student.shape
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if D < 1:
        raise ValueError("student and teacher must have at least one feature, got 0")
    if kind not in (0, 1, 2):
        raise ValueError(f"kind must be 0 (mse), 1 (cosine) or 2 (normalized_mse), got {kind}")
    if mask is not None:
        mask = _vector("mask", mask, device, N, torch.bool)
    gs = _scalar("grad_scale", grad_scale, device)
    rows = torch.empty(N, dtype=torch.float32, device=device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
    if N == 0:
        return rows, grad
    with torch.cuda.device(device):
        status = _ext._C.feature_cuda(
            student.data_ptr(), _ext.dtype_code(student), student.stride(0),
            teacher.data_ptr(), _ext.dtype_code(teacher), teacher.stride(0),
            mask.data_ptr() if mask is not None else 0,
            grad.data_ptr() if grad is not None else 0, grad.stride(0) if grad is not None else 0,
            rows.data_ptr(), N, D, kind, gs.data_ptr(), _stream(device))
    _check(status, "feature_cuda")
    return rows, grad


def scale_rows_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """``grad[r] *= factor[r]`` (factor [N]) or ``grad *= factor`` (0-d), in place on the
    device; rows whose factor is exactly 1 are not touched. grad: [N, W] with unit stride
    along W, or [N] (one column)."""
    device = _device_of("grad", grad)
    g2 = grad.unsqueeze(1) if grad.dim() == 1 else grad
    _rows("grad", g2, device)
    _output_rows("grad", g2, g2)
    N, W = g2.shape
    per_row = factor.dim() > 0
    if per_row:
        f = _vector("factor", factor.to(device=device, dtype=torch.float32), device, N,
                    torch.float32)
    else:
        f = _scalar("factor", factor, device)
    if N == 0 or W == 0:
        return
    if W > MAX_SCALE_COLS:
        g2.mul_(f.unsqueeze(1) if per_row else f)
        return
    with torch.cuda.device(device):
        status = _ext._C.scale_rows_cuda(g2.data_ptr(), _ext.dtype_code(g2), g2.stride(0), N, W,
                                         f.data_ptr(), per_row, _stream(device))
    _check(status, "scale_rows_cuda")
