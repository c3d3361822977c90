"""Test configuration. Without a CUDA device, TRITON_INTERPRET must be set before any Triton
kernel module is imported, so that the triton backend runs on CPU tensors through the
interpreter. With one, the Triton kernels compile for it (the gpu-marked tests use them)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# compiled graphs must come from this checkout, not from an on-disk cache of an older one
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
