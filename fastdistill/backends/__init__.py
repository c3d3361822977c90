"""Backend selection.

``backend="auto"`` picks, for CUDA tensors, triton (then cuda, then torch); for CPU tensors, cpu
when the extension is built, else torch. Asking for a backend that cannot serve the tensors
raises :class:`BackendUnavailableError`, which says why.

Every backend module exposes the same functions (see backends/torch_backend.py for the contract):
``distill_forward`` and ``feature_forward``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Tuple

import torch

from fastdistill.backends import _ext

from fastdistill.config import BACKENDS  # noqa: E402,F401 (the names, defined once)


class BackendUnavailableError(ValueError, RuntimeError):
    """The requested backend cannot run here (not built, no GPU, triton missing, or the
    tensors are on a device it does not serve). A ValueError for argument checks and a
    RuntimeError for environment checks alike."""


def triton_interpreting() -> bool:
    from fastdistill.kernels import interpreting
    return interpreting()


def _triton_importable() -> Tuple[bool, str]:
    """Imports the Triton kernels themselves (not only triton): what is reported available
    must load."""
    try:
        import fastdistill.kernels.distill  # noqa: F401
        return True, ""
    except ImportError as e:
        return False, f"the Triton kernels cannot be imported ({e}); pip install triton"


def check(name: str, device: torch.device) -> Tuple[bool, str]:
    """(available, reason if not) for backend ``name`` on tensors of ``device``."""
    if name == "torch":
        return True, ""
    if name == "cpu":
        if _ext._C is None:
            return False, _ext.unavailable_reason()
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got tensors on {device}"
        return True, ""
    if name == "cuda":
        if _ext._C is None:
            return False, _ext.unavailable_reason()
        if not _ext._C.has_cuda:
            return False, ("fastdistill._C was built without CUDA kernels (nvcc was not found "
                           "at build time; set CUDA_HOME and reinstall)")
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got tensors on {device}"
        return True, ""
    if name == "triton":
        ok, why = _triton_importable()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and triton_interpreting():
            return True, ""
        return False, (f"the triton backend runs on CUDA tensors (or on CPU tensors under "
                       f"TRITON_INTERPRET=1), got tensors on {device}")
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


_warned_no_ext = False


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (may be "auto") and tensors on ``device``."""
    global _warned_no_ext
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        ok, why = check(backend, device)
        if not ok:
            raise BackendUnavailableError(f"backend={backend!r} is unavailable: {why}")
        return backend
    if device.type == "cuda":
        for name in ("triton", "cuda"):
            if check(name, device)[0]:
                return name
        return "torch"
    if device.type == "cpu" and check("cpu", device)[0]:
        return "cpu"
    if device.type == "cpu" and not _warned_no_ext:
        _warned_no_ext = True
        warnings.warn(f"fastdistill: using the torch backend on CPU because "
                      f"{_ext.unavailable_reason()}", RuntimeWarning, stacklevel=3)
    return "torch"


def get(name: str):
    """The backend module implementing ``name`` (a concrete backend)."""
    return importlib.import_module(f"fastdistill.backends.{name}_backend")


def summary() -> str:
    """One line: which backends this installation can use."""
    parts = []
    cpu = torch.device("cpu")
    parts.append("torch")
    parts.append("cpu" + ("" if check("cpu", cpu)[0] else " (not built)"))
    if _ext._C is not None:
        parts[-1] += f" [{_ext._C.cpu_isa()}]"
    has_gpu = torch.cuda.is_available()
    cuda_built = _ext._C is not None and _ext._C.has_cuda
    parts.append("cuda" + ("" if cuda_built and has_gpu else
                           " (built, no GPU)" if cuda_built else " (not built)"))
    tri, _ = _triton_importable()
    parts.append("triton" + ("" if tri and has_gpu else " (interpreter only)" if tri
                             else " (not installed)"))
    return ", ".join(parts)
