"""The boundary between tensors and the compiled kernels of ``fastdistill._C``.

Every check a raw pointer needs (dtype, device, shape, unit stride along rows, non-overlapping
output rows, sizes the kernels index with) happens here, once, before a pointer crosses; the
result is one of the typed argument structs of ``csrc/include/fastdistill/args.h``
(``_C.DistillArgs``, ``_C.FeatureArgs``, ``_C.ScaleArgs``). The cpu and cuda backends build their
structs only through these functions. Failures are ValueError / TypeError naming the argument.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastdistill.config import FEATURE_KINDS

try:
    from fastdistill import _C  # type: ignore[attr-defined]
    LOAD_ERROR = None
except ImportError as e:  # not built (no compiler), or built for another Python
    _C = None
    LOAD_ERROR = str(e)

# csrc/include/fastdistill/config.h: enum DType
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

STATUS_MESSAGES = {
    1: "bad argument (internal: the Python checks should have caught this)",
    2: "unsupported dtype",
    3: "CUDA error",
}

# One block per row (grid.x) on CUDA, int column indices within a row (csrc/cuda/common.cuh).
MAX_ROWS = 2 ** 31 - 1
MAX_COLS = 2 ** 31 - 1 - 2 ** 20
# csrc/cuda/scale_cuda.cu: grid.y counts blocks of 256 x 4 columns
MAX_SCALE_COLS = 65535 * 256 * 4


def unavailable_reason() -> str:
    return ("the compiled extension fastdistill._C is not available "
            f"({LOAD_ERROR}); reinstall with a C++ compiler (g++) to build it")


def check_status(status: int, what: str, detail: str = "") -> None:
    if status != 0:
        msg = STATUS_MESSAGES.get(status, f"status {status}")
        raise RuntimeError(f"fastdistill._C.{what} failed: {msg}{': ' + detail if detail else ''}")


def _ptr(x: Optional[torch.Tensor]) -> int:
    return x.data_ptr() if x is not None else 0


def _tensor(name: str, x, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (every tensor of one "
                         "kernel call must be on the same device)")
    return x


def _rows(name: str, x, device: torch.device, dtype: Optional[torch.dtype] = None) -> int:
    """x: a 2-D float tensor (or `dtype`) on `device` with unit stride along its rows; returns
    its dtype code."""
    _tensor(name, x, device)
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, columns], got shape {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides "
                         f"{tuple(x.stride())}")
    if x.shape[0] > MAX_ROWS or x.shape[1] > MAX_COLS:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; the kernels take at most "
                         f"{MAX_ROWS} rows of at most {MAX_COLS} columns")
    return DTYPE_CODES[x.dtype]


def _out_rows(name: str, x, like: torch.Tensor) -> None:
    """An output buffer: the shape and dtype of `like`, rows that do not overlap."""
    _rows(name, x, like.device, like.dtype)
    if x.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.shape[0] > 1 and x.shape[1] > 0 and x.stride(0) < x.shape[1]:
        raise ValueError(f"{name} has overlapping rows (strides {tuple(x.stride())})")


def _vector(name: str, x, device: torch.device, n: int, dtype: torch.dtype) -> None:
    """A contiguous [n] tensor of `dtype` on `device`."""
    _tensor(name, x, device)
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.shape != (n,) or (n > 1 and x.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous tensor of shape ({n},), got shape "
                         f"{tuple(x.shape)} with strides {tuple(x.stride())}")


def _scalar(name: str, x, device: torch.device) -> None:
    _tensor(name, x, device)
    if x.dtype != torch.float32 or x.numel() != 1:
        raise TypeError(f"{name} must be a one-element float32 tensor, got {x.dtype} of shape "
                        f"{tuple(x.shape)}")


def distill_args(student, teacher, labels, grad, rows, grad_scale, opts, vocab: int, *,
                 threads: int = 1, stream: int = 0):
    """``_C.DistillArgs`` for a logit-level call on 2-D ``student [N, Vs]``, ``teacher
    [N, Vt]``; ``labels [N]`` int64 or None; ``grad`` the student's shape and dtype (may be
    the student itself) or None; ``rows [N]`` float32; ``grad_scale`` one float32 on the
    device; ``opts`` a ``fastdistill.config.KernelOptions``."""
    device = student.device if isinstance(student, torch.Tensor) else None
    s_code = _rows("student_logits", student, device)
    t_code = _rows("teacher_logits", teacher, device)
    N, Vs = student.shape
    if teacher.shape[0] != N:
        raise ValueError(f"teacher_logits has {teacher.shape[0]} rows, student_logits {N}")
    if not 1 <= vocab <= min(Vs, teacher.shape[1]):
        raise ValueError(f"vocab must be in [1, {min(Vs, teacher.shape[1])}], got {vocab}")
    if labels is not None:
        _vector("labels", labels, device, N, torch.int64)
    _vector("loss rows", rows, device, N, torch.float32)
    if grad is not None:
        _out_rows("grad", grad, student)
        _scalar("grad_scale", grad_scale, device)
    a = _C.DistillArgs()
    a.student, a.s_dtype, a.s_stride = student.data_ptr(), s_code, student.stride(0)
    a.teacher, a.t_dtype, a.t_stride = teacher.data_ptr(), t_code, teacher.stride(0)
    a.labels = _ptr(labels)
    a.grad, a.g_stride, a.grad_width = _ptr(grad), grad.stride(0) if grad is not None else 0, Vs
    a.loss_rows, a.n_rows = rows.data_ptr(), N
    a.grad_scale = _ptr(grad_scale) if grad is not None else 0
    p = a.params
    p.divergence, p.beta = opts.divergence, opts.beta
    p.s_mul, p.t_mul, p.h_mul = opts.s_mul, opts.t_mul, opts.h_mul
    p.h_ratio = opts.h_mul / opts.s_mul
    p.soft_scale, p.hard_weight = opts.soft_scale, opts.hard_weight
    p.ignore_index, p.vocab = opts.ignore_index, vocab
    a.num_threads, a.stream = threads, stream
    return a


# csrc/include/fastdistill/feature.h: enum FeatureKind, the positions in config.FEATURE_KINDS
FEATURE_KIND_CODES = {k: i for i, k in enumerate(FEATURE_KINDS)}


def feature_args(student, teacher, mask, grad, rows, grad_scale, kind: int, *, threads: int = 1,
                 stream: int = 0):
    """``_C.FeatureArgs`` for 2-D ``student [N, D]``, ``teacher [N, D]``, ``mask [N]`` bool or
    None, ``grad`` the student's shape and dtype or None, ``rows [N]`` float32."""
    device = student.device if isinstance(student, torch.Tensor) else None
    s_code = _rows("student", student, device)
    t_code = _rows("teacher", teacher, device)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    N, D = student.shape
    if D < 1:
        raise ValueError("student and teacher must have at least one feature, got 0")
    if kind not in FEATURE_KIND_CODES.values():
        raise ValueError(f"kind must be one of {FEATURE_KIND_CODES}, got {kind}")
    if mask is not None:
        _vector("mask", mask, device, N, torch.bool)
    _vector("loss rows", rows, device, N, torch.float32)
    if grad is not None:
        _out_rows("grad", grad, student)
        _scalar("grad_scale", grad_scale, device)
    a = _C.FeatureArgs()
    a.student, a.s_dtype, a.s_stride = student.data_ptr(), s_code, student.stride(0)
    a.teacher, a.t_dtype, a.t_stride = teacher.data_ptr(), t_code, teacher.stride(0)
    a.mask = _ptr(mask)
    a.grad, a.g_stride = _ptr(grad), grad.stride(0) if grad is not None else 0
    a.loss_rows, a.n_rows, a.dim, a.kind = rows.data_ptr(), N, D, kind
    a.grad_scale = _ptr(grad_scale) if grad is not None else 0
    a.num_threads, a.stream = threads, stream
    return a


def scale_args(grad, factor, *, stream: int = 0):
    """``_C.ScaleArgs`` for ``grad [N, W]`` (unit stride along W, rows not overlapping) times
    ``factor`` (one float32, or float32 [N] per row)."""
    device = grad.device if isinstance(grad, torch.Tensor) else None
    code = _rows("grad", grad, device)
    _out_rows("grad", grad, grad)
    N, W = grad.shape
    if W > MAX_SCALE_COLS:
        raise ValueError(f"grad has {W} columns; the scaling kernel takes at most "
                         f"{MAX_SCALE_COLS}")
    per_row = factor.dim() > 0
    if per_row:
        _vector("factor", factor, device, N, torch.float32)
    else:
        _scalar("factor", factor, device)
    a = _C.ScaleArgs()
    a.grad, a.dtype, a.stride = grad.data_ptr(), code, grad.stride(0)
    a.n_rows, a.width, a.factor, a.per_row, a.stream = N, W, factor.data_ptr(), per_row, stream
    return a


INDEX_CODES = {torch.int32: 0, torch.int64: 1}
TOPK_TAIL_CODES = (0, 1, 2)  # csrc/include/fastdistill/args.h: enum TopkTail
# csrc/cuda/topk_cuda.cu: the row's bitmask in at most 48 KB of shared memory
MAX_TOPK_CUDA_VOCAB = (48 << 10) * 8


def _index_rows(name: str, x, device: torch.device, n: int, k: int) -> int:
    _tensor(name, x, device)
    if x.dtype not in INDEX_CODES:
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    if x.shape != (n, k):
        raise ValueError(f"{name} must have shape ({n}, {k}), got {tuple(x.shape)}")
    if k > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension, got strides "
                         f"{tuple(x.stride())}")
    return INDEX_CODES[x.dtype]


def topk_args(student, indices, logprobs, labels, grad, rows, grad_scale, work, opts, tail: int,
              vocab: int, *, cuda: bool = False, threads: int = 1, stream: int = 0):
    """``_C.TopkArgs`` for a top-k call on 2-D ``student [N, Vs]``, ``indices [N, K]`` int32 /
    int64, ``logprobs [N, K]`` float; ``labels [N]`` int64 or None; ``grad`` the student's
    shape and dtype (may be the student) or None; ``rows [N]`` float32; ``work [N, K]`` float32
    (the CUDA kernels' scratch, needed with a gradient) or None; ``opts`` a KernelOptions
    (t_mul unused); ``tail`` 0 bucket, 1 none, 2 renormalize."""
    device = student.device if isinstance(student, torch.Tensor) else None
    s_code = _rows("student_logits", student, device)
    N, Vs = student.shape
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError("teacher_topk indices must be a 2-D tensor [rows, K]")
    K = indices.shape[1]
    if K < 1:
        raise ValueError("teacher_topk indices must have K >= 1 entries per row")
    i_code = _index_rows("teacher_topk indices", indices, device, N, K)
    l_code = _rows("teacher_topk logprobs", logprobs, device)
    if logprobs.shape != (N, K):
        raise ValueError(f"teacher_topk logprobs must have shape ({N}, {K}), got "
                         f"{tuple(logprobs.shape)}")
    if not 1 <= vocab <= Vs:
        raise ValueError(f"vocab must be in [1, {Vs}], got {vocab}")
    if tail not in TOPK_TAIL_CODES:
        raise ValueError(f"tail must be one of {TOPK_TAIL_CODES}, got {tail}")
    if cuda and vocab > MAX_TOPK_CUDA_VOCAB:
        raise ValueError(f"the cuda backend's top-k kernel takes vocabularies of at most "
                         f"{MAX_TOPK_CUDA_VOCAB} columns (a bitmask of V bits per row in shared "
                         f"memory), got {vocab}; use backend='triton'")
    if labels is not None:
        _vector("labels", labels, device, N, torch.int64)
    _vector("loss rows", rows, device, N, torch.float32)
    if grad is not None:
        _out_rows("grad", grad, student)
        _scalar("grad_scale", grad_scale, device)
    if work is not None:
        _tensor("work", work, device)
        if work.dtype != torch.float32 or work.shape != (N, K) or not work.is_contiguous():
            raise ValueError(f"work must be a contiguous float32 tensor of shape ({N}, {K})")
    elif cuda and grad is not None:
        raise ValueError("work ([N, K] float32) is needed by the CUDA kernel with a gradient")
    a = _C.TopkArgs()
    a.student, a.s_dtype, a.s_stride = student.data_ptr(), s_code, student.stride(0)
    a.indices, a.i_dtype, a.i_stride = indices.data_ptr(), i_code, indices.stride(0)
    a.logprobs, a.l_dtype, a.l_stride = logprobs.data_ptr(), l_code, logprobs.stride(0)
    a.labels = _ptr(labels)
    a.grad, a.g_stride, a.grad_width = _ptr(grad), grad.stride(0) if grad is not None else 0, Vs
    a.loss_rows, a.n_rows = rows.data_ptr(), N
    a.grad_scale = _ptr(grad_scale) if grad is not None else 0
    a.work = _ptr(work)
    p = a.params
    p.divergence, p.beta = opts.divergence, opts.beta
    p.s_mul, p.h_mul = opts.s_mul, opts.h_mul
    p.soft_scale, p.hard_weight = opts.soft_scale, opts.hard_weight
    p.ignore_index, p.vocab, p.k, p.tail = opts.ignore_index, vocab, K, tail
    a.num_threads, a.stream = threads, stream
    return a
