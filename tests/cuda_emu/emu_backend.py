"""A test backend that runs the CUDA kernels' own source on CPU tensors, through the host
emulation of the CUDA built-ins (build.py). It has the contract of fastdistill/backends/
torch_backend.py and builds its argument structs with the package's own boundary
(fastdistill/backends/_ext.py), so the emulated launchers see exactly what the cuda backend would
pass them. tests/conftest.py makes it selectable as backend="cuda_emu"."""

from __future__ import annotations

import ctypes
import functools

import torch

from fastdistill.backends import _ext

import build as emu_build


@functools.lru_cache(maxsize=None)
def lib():
    return emu_build.load()


def _run(fn, args, what):
    status = fn(ctypes.c_void_p(args.address))
    if status != 0:
        raise RuntimeError(f"emulated {what} failed with status {status}: "
                           f"{lib().emu_last_error().decode()}")


def _scale(x):
    return x.reshape(()).to(dtype=torch.float32).contiguous()


def distill_forward(student, teacher, labels, opts, vocab, grad_scale, need_grad, grad_out=None):
    rows = torch.full((student.shape[0],), -1.0)  # no zeros by luck
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.full_like(student, 7.0)
    args = _ext.distill_args(student, teacher, labels, grad, rows, _scale(grad_scale), opts,
                             vocab)
    if student.shape[0]:
        _run(lib().emu_distill, args, "distill_rows")
    return rows, grad


def feature_forward(student, teacher, mask, kind, grad_scale, need_grad):
    rows = torch.full((student.shape[0],), -1.0)
    grad = torch.full_like(student, 7.0) if need_grad else None
    args = _ext.feature_args(student, teacher, mask, grad, rows, _scale(grad_scale), kind)
    if student.shape[0]:
        _run(lib().emu_feature, args, "feature_rows")
    return rows, grad


def scale_rows_(grad, factor):
    g2 = grad.unsqueeze(1) if grad.dim() == 1 else grad
    f = factor.to(dtype=torch.float32).contiguous()
    if g2.numel():
        _run(lib().emu_scale, _ext.scale_args(g2, f), "scale_rows")


def topk_forward(student, indices, logprobs, labels, opts, tail, vocab, grad_scale, need_grad,
                 grad_out=None):
    rows = torch.full((student.shape[0],), -1.0)
    grad = work = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.full_like(student, 7.0)
        work = torch.full(indices.shape, 5.0)
    args = _ext.topk_args(student, indices, logprobs, labels, grad, rows, _scale(grad_scale),
                          work, opts, tail, vocab, cuda=True)
    if student.shape[0]:
        _run(lib().emu_topk, args, "topk_rows")
    return rows, grad
