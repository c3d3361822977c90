"""Loads the compiled extension ``fastdistill._C`` if it was built, and its dtype codes."""

from __future__ import annotations

import torch

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


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"expected float32, float16 or bfloat16, got {t.dtype}") from None


def check_status(status: int, what: str, detail: str = "") -> None:
    if status != 0:
        msg = STATUS_MESSAGES.get(status, f"status {status}")
        raise RuntimeError(f"fastdistill._C.{what} failed: {msg}{': ' + detail if detail else ''}")


def unavailable_reason() -> str:
    return ("the compiled extension fastdistill._C is not available "
            f"({LOAD_ERROR}); reinstall with a C++ compiler (g++) to build it")
