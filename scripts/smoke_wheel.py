#!/usr/bin/env python3
"""Checks an installed fastdistill (a wheel, in an environment of its own) beside whatever torch
that environment has:

* fastdistill is imported from the environment, not from a source tree, and its compiled
  extension loads;
* forward and backward of distill_loss (every divergence, float32 and bfloat16),
  linear_distill_loss and feature_loss on the cpu backend agree with the torch backend;
* `python -m fastdistill.info --json` runs and reports the CUDA architectures the binary holds.

    python scripts/smoke_wheel.py          (run it from outside the source tree)

Used by `make wheel`, the tests (tests/test_build.py), scripts/check_wheel_torch.sh and
cibuildwheel's test-command. Prints one summary line; exits non-zero on the first failure.
"""

import json
import os
import subprocess
import sys

import torch

import fastdistill as fd
from fastdistill.backends import _ext


def agree(name, got, want, rtol=1e-4, atol=1e-5):
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{name}: {got.dtype} {tuple(got.shape)} vs "
                             f"{want.dtype} {tuple(want.shape)}")
    if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
        diff = (got.float() - want.float()).abs().max().item()
        raise AssertionError(f"{name}: cpu and torch backends differ by {diff}")


def both_backends(fn, *inputs):
    """{backend: (loss, grads of the inputs that require them)} for the cpu and torch backends."""
    out = {}
    for backend in ("cpu", "torch"):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        loss = fn(*xs, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), [x.grad for x in xs if x.requires_grad])
    return out


def check_pair(name, out, rtol=1e-4, atol=1e-5):
    (loss_c, grads_c), (loss_t, grads_t) = out["cpu"], out["torch"]
    if not torch.isfinite(loss_c).all():
        raise AssertionError(f"{name}: loss {loss_c}")
    agree(f"{name} loss", loss_c, loss_t, rtol, atol)
    for i, (gc, gt) in enumerate(zip(grads_c, grads_t)):
        if gc is None or gc.abs().sum() == 0:
            raise AssertionError(f"{name}: no gradient for input {i}")
        agree(f"{name} grad {i}", gc, gt, rtol, atol)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(fd.__file__)))
    if os.path.exists(os.path.join(root, "setup.py")):
        raise AssertionError(f"fastdistill was imported from a source tree ({fd.__file__}), "
                             "not from the installed wheel; run this from another folder")
    if _ext._C is None:
        raise AssertionError(f"fastdistill._C does not load: {_ext.LOAD_ERROR}")
    build = _ext._C.build_info()
    if build["version"] != fd.__version__:
        raise AssertionError(f"_C is version {build['version']}, the package {fd.__version__}")

    torch.manual_seed(0)
    N, V = 6, 257
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    for divergence in fd.DIVERGENCES:
        for dtype, tol in ((torch.float32, (1e-4, 1e-5)), (torch.bfloat16, (2e-2, 2e-3))):
            s = (3 * torch.randn(N, V)).to(dtype).requires_grad_()
            t = (3 * torch.randn(N, V)).to(dtype)
            out = both_backends(
                lambda s_, t_, backend: fd.distill_loss(
                    s_, t_, labels, divergence=divergence, temperature=2.0, hard_weight=0.5,
                    backend=backend), s, t)
            check_pair(f"distill_loss {divergence} {dtype}", out, *tol)
            if out["cpu"][1][0].dtype != dtype:
                raise AssertionError(f"gradient dtype {out['cpu'][1][0].dtype}, expected {dtype}")

    D = 24
    h = torch.randn(N, D, requires_grad=True)
    w = (0.3 * torch.randn(V, D)).requires_grad_()
    th, tw = torch.randn(N, 2 * D), 0.3 * torch.randn(V, 2 * D)
    check_pair("linear_distill_loss", both_backends(
        lambda h_, w_, backend: fd.linear_distill_loss(h_, w_, th, tw, labels, divergence="jsd",
                                                       hard_weight=0.3, backend=backend), h, w))
    for kind in fd.FEATURE_KINDS:
        check_pair(f"feature_loss {kind}", both_backends(
            lambda a, b, backend: fd.feature_loss(a, b, kind=kind, backend=backend),
            torch.randn(N, D, requires_grad=True), torch.randn(N, D)))

    out = subprocess.run([sys.executable, "-m", "fastdistill.info", "--json"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"python -m fastdistill.info failed:\n{out.stderr}")
    info = json.loads(out.stdout)
    ext = info["extension"]
    if (ext["cuda_sass"], ext["cuda_ptx"]) != (build["cuda_sass"], build["cuda_ptx"]):
        raise AssertionError(f"fastdistill.info reports {ext}, the binary {build}")
    cuda = (f"CUDA {build['cuda_version']}: SASS "
            + (" ".join(f"sm_{a}" for a in build["cuda_sass"]) or "none") + ", PTX "
            + (" ".join(f"compute_{a}" for a in build["cuda_ptx"]) or "none")
            if build["cuda"] else "no CUDA kernels")
    print(f"smoke ok: fastdistill {fd.__version__} from {os.path.dirname(fd.__file__)}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}, cpu isa "
          f"{build['cpu_isa']}, {cuda}; cpu == torch backend for {len(fd.DIVERGENCES)} "
          f"divergences x 2 dtypes, linear and {len(fd.FEATURE_KINDS)} feature kinds")


if __name__ == "__main__":
    main()
