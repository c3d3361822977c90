"""Helpers shared by the tests: the (device, backend, dtype) cases of an op, input makers,
tolerances and the float64 oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastdistill as fd
from fastdistill import backends
from fastdistill.reference import reference_distill_loss

CPU = torch.device("cpu")
GPU = torch.device("cuda")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)


def _emu_available() -> bool:
    import build as emu_build
    return emu_build.compiler() is not None and backends.check("cpu", CPU)[0]


def cpu_backends():
    """Backends that run on CPU tensors here: triton through its interpreter, and the CUDA
    kernels' source through the host emulation (cuda_emu)."""
    out = [b for b in ("torch", "cpu", "triton") if backends.check(b, CPU)[0]]
    return out + (["cuda_emu"] if _emu_available() else [])


def gpu_backends():
    """The backends for CUDA tensors that this installation has."""
    return ["torch"] + [b for b in ("cuda", "triton") if backends.check(b, GPU)[0]]


def supported(backend: str, device: str, dtype: torch.dtype) -> bool:
    # The Triton interpreter cannot do bf16 arithmetic (triton issue 11584): bf16 runs on the
    # other CPU backends here and on every backend on a GPU.
    return not (device == "cpu" and backend == "triton" and dtype == BF16)


def cases(dtypes=(F32,), cpu=True, gpu=True, only=None):
    """pytest params (device, backend, dtype) over every backend of both devices; the GPU ones
    carry the gpu mark (skipped without a CUDA device). `only` restricts the backends."""
    out = []
    if cpu:
        for b, dt in itertools.product(cpu_backends(), dtypes):
            if (only is None or b in only) and supported(b, "cpu", dt):
                out.append(pytest.param("cpu", b, dt, id=f"cpu-{b}-{str(dt)[6:]}"))
    if gpu:
        gb = gpu_backends() if torch.cuda.is_available() else ["torch", "cuda", "triton"]
        for b, dt in itertools.product(gb, dtypes):
            if only is None or b in only:
                out.append(pytest.param("cuda", b, dt, id=f"gpu-{b}-{str(dt)[6:]}",
                                        marks=pytest.mark.gpu))
    return out


def small(backend: str, device="cpu") -> bool:
    """Interpreted and emulated kernels run one program (or thread) at a time: small shapes."""
    return device == "cpu" and backend in ("triton", "cuda_emu")


def logits(shape, dtype=torch.float32, scale=3.0, device=CPU):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def run_both(student, teacher, labels=None, grad_out=None, **kw):
    """Loss and student gradient from fastdistill and from the float64 reference (on the same,
    already rounded inputs). Returns (loss, grad, ref_loss, ref_grad)."""
    backend = kw.pop("backend", "auto")
    s = student.detach().clone().requires_grad_(True)
    loss = fd.distill_loss(s, teacher, labels, backend=backend, **kw)
    s64 = student.detach().to(torch.float64).requires_grad_(True)
    ref = reference_distill_loss(s64, teacher.detach().to(torch.float64), labels, **kw)
    if grad_out is None:
        grad_out = torch.ones_like(ref)
    loss.backward(grad_out.to(loss.dtype))
    if ref.requires_grad:
        ref.backward(grad_out.to(torch.float64))
        ref_grad = s64.grad
    else:  # the loss does not depend on the student (e.g. skew_forward_kl at beta = 1)
        ref_grad = torch.zeros_like(s64)
    return loss.detach(), s.grad, ref.detach(), ref_grad


def assert_close(actual, expected, *, rtol, atol, what=""):
    actual = actual.to(torch.float64).cpu()
    expected = expected.to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# Tolerances against the float64 oracle for float32 inputs. Losses are sums over V terms in
# float32; gradients are elementwise O(1/N) values.
LOSS_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)


def tolerances(dtype):
    """(loss, gradient) tolerances for inputs of `dtype`: the reference sees the same rounded
    inputs; the gradient is written in `dtype` (one rounding of each element)."""
    if dtype == torch.float32:
        return LOSS_TOL, GRAD_TOL
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    return LOSS_TOL, dict(rtol=eps, atol=1e-5)
