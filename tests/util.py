"""Helpers shared by the tests: the backends to run, input makers and the float64 oracle."""

from __future__ import annotations

import torch

import fastdistill as fd
from fastdistill import backends
from fastdistill.divergences import reference_distill_loss

CPU = torch.device("cpu")
GPU = torch.device("cuda")


def cpu_backends():
    """Backends that run on CPU tensors here (triton through its interpreter)."""
    return [b for b in ("torch", "cpu", "triton") if backends.check(b, CPU)[0]]


def gpu_backends():
    """The fused backends for CUDA tensors that this installation has (tests using them carry
    @pytest.mark.gpu and are skipped without a GPU)."""
    return [b for b in ("cuda", "triton") if backends.check(b, GPU)[0]]


def small(backend: str) -> bool:
    """The Triton interpreter runs programs one after another: keep its shapes small."""
    return backend == "triton"


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
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# Tolerances against the float64 oracle for float32 inputs. Losses are sums over V terms in
# float32; gradients are elementwise O(1/N) values.
LOSS_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-4, atol=2e-6)
