"""Triton kernels, installed as the package ``fastdistill.kernels``.

One module per op family; each holds its kernels and, at the bottom, the launcher that the
triton backend calls. Importing this package does not import triton.
"""

import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels run on CPU tensors, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Multiprocessors assumed for tensors that are not on a CUDA device (CPU tensors under the
# interpreter; meta tensors when fastdistill.bench.aot records launches for a GPU target).
VIRTUAL_MULTIPROCESSORS = 4


def multiprocessor_count(device) -> int:
    """SM count of a CUDA device; VIRTUAL_MULTIPROCESSORS for any other device."""
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_properties(device).multi_processor_count
    return VIRTUAL_MULTIPROCESSORS
