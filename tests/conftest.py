"""Test configuration.

Without a CUDA device, TRITON_INTERPRET must be set before any Triton kernel module is imported,
so that the triton backend runs on CPU tensors through the interpreter. With one, the Triton
kernels compile for it (the gpu-marked tests use them).

``backend="cuda_emu"`` (tests only): the CUDA kernels' own source run on CPU tensors through the
host emulation of tests/cuda_emu/, selectable like any backend in the tests that take a
``backend`` parameter.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# compiled graphs must come from this checkout, not from an on-disk cache of an older one
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))

import pytest  # noqa: E402

try:  # property tests (tests/test_properties.py): a fixed seed and example count in CI
    from hypothesis import settings as _hyp

    _hyp.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          database=None)
    _hyp.register_profile("dev", max_examples=300, deadline=None, print_blob=True)
    _hyp.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


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


@pytest.fixture(autouse=True)
def _emulated_cuda_backend(request, monkeypatch):
    spec = getattr(request.node, "callspec", None)
    if spec is None or spec.params.get("backend") != "cuda_emu":
        return
    import emu_backend
    from fastdistill import backends, config
    get, resolve = backends.get, backends.resolve
    monkeypatch.setattr(config, "BACKENDS", config.BACKENDS + ("cuda_emu",))
    monkeypatch.setattr(backends, "get",
                        lambda name: emu_backend if name == "cuda_emu" else get(name))
    monkeypatch.setattr(backends, "resolve",
                        lambda b, d: "cuda_emu" if b == "cuda_emu" else resolve(b, d))


@pytest.fixture(scope="session")
def aot_records(tmp_path_factory):
    """Every Triton kernel compiled for sm_80 and sm_90 as its launcher specialises it
    (fastdistill.bench.aot), in two processes without TRITON_INTERPRET: the benchmark settings
    and the heavier variant (hard loss, T != 1, softcap) on sm_90, the heavier variant on sm_80.
    One compile per session, shared by test_aot.py and test_roofline.py; the records (SASS
    included) are cached by source hash and specialisation (FASTDISTILL_AOT_CACHE or
    ~/.cache/fastdistill/aot)."""
    pytest.importorskip("triton", reason="triton not installed")
    from fastdistill.bench import aot
    return aot.compile_in_subprocess((80, 90), out_dir=str(tmp_path_factory.mktemp("aot")),
                                     variants={80: ("hard",), 90: ("bench", "hard")})
