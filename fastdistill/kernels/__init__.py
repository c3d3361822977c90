"""Triton kernels, installed as the package ``fastdistill.kernels``.

One module per op family; each holds its kernels and, at the bottom, the launcher that the
triton backend calls. Importing this package does not import triton.
"""

import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
