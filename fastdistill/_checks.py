"""Argument checks shared by the public functions. Every failure is a ValueError or TypeError
that names the argument and says what was expected."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, x, *, floating: bool = True, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape "
                         f"{tuple(x.shape)}")
    return x


def same_device(names: Sequence[str], xs: Sequence[Optional[torch.Tensor]]) -> torch.device:
    """The device of the tensors among xs (others are type-checked where they are used)."""
    pairs = [(n, x) for n, x in zip(names, xs) if isinstance(x, torch.Tensor)]
    dev = pairs[0][1].device
    for n, x in pairs[1:]:
        if x.device != dev:
            raise ValueError(f"{n} is on {x.device} but {pairs[0][0]} is on {dev}; "
                             "all tensors must be on the same device")
    return dev


def leading(name: str, x: torch.Tensor, lead: torch.Size, ref: str) -> None:
    if x.shape[:-1] != lead:
        raise ValueError(f"{name} has leading shape {tuple(x.shape[:-1])} but {ref} has "
                         f"{tuple(lead)}; they must match (shapes [..., V])")


def labels(x, lead: torch.Size) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {x.dtype}")
    if x.shape != lead:
        raise ValueError(f"labels must have the logits' leading shape {tuple(lead)}, got "
                         f"{tuple(x.shape)}")
    return x.reshape(-1).to(torch.int64)


def mask(x, lead: torch.Size, of: str = "logits'") -> torch.Tensor:
    """A bool tensor of the leading shape, flattened to [N] (True: the token counts)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"mask must be a bool tensor (True: the token counts), got {got}")
    if x.shape != lead:
        raise ValueError(f"mask must have the {of} leading shape {tuple(lead)}, got "
                         f"{tuple(x.shape)}")
    return x.reshape(-1)


def label_range(lab: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, vocab) other than ignore_index. Checked on CPU tensors only: on a GPU
    the check would synchronise, and the kernels give NaN for such rows instead."""
    if lab.device.type != "cpu" or lab.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= vocab))
    if bool(bad.any()):
        v = int(lab[bad][0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, "
                         f"found {v}")


def vocab(vocab_size, vs: int, vt: int, s_name="student_logits", t_name="teacher_logits") -> int:
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"{s_name} has {vs} columns and {t_name} has {vt}; pass vocab_size "
                             "(the number of real vocabulary entries) when the widths differ")
        if vs < 1:
            raise ValueError(f"{s_name} must have at least one vocabulary column, got 0")
        return vs
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size must be in [1, {min(vs, vt)}] (the narrower of "
                         f"{s_name} ({vs}) and {t_name} ({vt})), got {vocab_size}")
    return int(vocab_size)


def teacher_grad(teachers: Sequence[Tuple[str, Optional[torch.Tensor]]],
                 student_name: str, student_requires_grad: bool) -> None:
    """The teacher gets no gradient; if a teacher tensor requires one while the student does
    not, nothing could differentiate the loss: say so now rather than at backward."""
    if not torch.is_grad_enabled() or student_requires_grad:
        return
    for name, t in teachers:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad but {student_name} does not: the teacher "
                             "gets no gradient from fastdistill, so this loss has nothing to "
                             f"differentiate; detach {name} (or compute it under "
                             "torch.no_grad())")


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit stride along V (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def num_items(n, reduction: str):
    """num_items_in_batch: a finite number > 0 or a one-element tensor (checked on CPU; on a
    GPU the check would synchronise, and a bad value gives a NaN loss instead)."""
    if n is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch only applies to reduction='mean', got "
                         f"reduction={reduction!r}")
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got "
                             f"shape {tuple(n.shape)}")
        if n.dtype == torch.bool or n.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number tensor, got {n.dtype}")
        if n.device.type == "cpu" and not torch.compiler.is_compiling():
            v = float(n)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"num_items_in_batch must be > 0 and finite, got {v}")
        return n
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number or a tensor, got "
                        f"{type(n).__name__}")
    if not (math.isfinite(float(n)) and n > 0):
        raise ValueError(f"num_items_in_batch must be > 0 and finite, got {n}")
    return n
