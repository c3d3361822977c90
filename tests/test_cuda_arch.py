"""Which GPUs the CUDA kernels of a build can serve (fastdistill/backends/_cuda_arch.py), decided
without a GPU: a pure function of the device's compute capability and the SASS / PTX
architectures in the binary; and the cuda backend asks it on first use of a device."""

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _cuda_arch, _ext

SASS, PTX = [80, 90], [90]  # the default build: FASTDISTILL_CUDA_ARCHS="80;90+PTX"


@pytest.mark.parametrize("capability, image", [
    ((8, 0), "sm_80 SASS"),           # A100
    ((8, 6), "sm_80 SASS"),           # RTX 30xx, A10: same major, newer minor
    ((8, 9), "sm_80 SASS"),           # L4, RTX 40xx
    ((9, 0), "sm_90 SASS"),           # H100, H200
    ((10, 0), "compute_90 PTX (JIT)"),  # B200: no SASS of major 10, the PTX is JIT-compiled
    ((12, 0), "compute_90 PTX (JIT)"),  # RTX 50xx
])
def test_default_build_serves(capability, image):
    assert _cuda_arch.kernel_image(capability, SASS, PTX) == image
    assert _cuda_arch.problem(capability, SASS, PTX) is None


@pytest.mark.parametrize("capability", [(7, 5), (7, 0), (6, 1)])
def test_default_build_refuses_older_gpus_with_a_clear_message(capability):
    assert _cuda_arch.kernel_image(capability, SASS, PTX) is None
    msg = _cuda_arch.problem(capability, SASS, PTX, device="cuda:0, Tesla T4")
    arch = f"sm_{capability[0]}{capability[1]}"
    assert f"cuda:0, Tesla T4 ({arch})" in msg
    assert "SASS for sm_80, sm_90 and PTX for compute_90" in msg
    assert "backend='triton'" in msg and f'FASTDISTILL_CUDA_ARCHS="{arch[3:]}"' in msg


def test_sass_serves_only_its_own_major_and_newer_minors():
    assert _cuda_arch.kernel_image((8, 6), [86], []) == "sm_86 SASS"
    assert _cuda_arch.kernel_image((8, 0), [86], []) is None   # older minor
    assert _cuda_arch.kernel_image((9, 0), [80], []) is None   # newer major needs PTX
    assert _cuda_arch.kernel_image((8, 9), [80, 86], []) == "sm_86 SASS"  # the closest one


def test_without_ptx_newer_gpus_are_refused():
    assert _cuda_arch.kernel_image((10, 0), [80, 90], []) is None
    msg = _cuda_arch.problem((10, 0), [80, 90], [])
    assert "(sm_100)" in msg and "PTX for no architecture" in msg


def test_ptx_serves_its_architecture_and_newer_only():
    assert _cuda_arch.kernel_image((9, 0), [], [90]) == "compute_90 PTX (JIT)"
    assert _cuda_arch.kernel_image((8, 9), [], [90]) is None
    assert _cuda_arch.kernel_image((12, 1), [], [80, 90]) == "compute_90 PTX (JIT)"


def test_driver_older_than_the_cuda_major_of_the_build_is_refused():
    msg = _cuda_arch.problem((9, 0), SASS, PTX, driver_version=12080, cuda_version="13.0")
    assert "driver supports CUDA 12.8" in msg and "CUDA 13.0 or newer" in msg
    # minor version compatibility: SASS built with 13.0 runs on any 13.x driver
    assert _cuda_arch.problem((9, 0), SASS, PTX, driver_version=13000, cuda_version="13.0") is None


def test_ptx_needs_a_driver_as_new_as_the_toolkit():
    msg = _cuda_arch.problem((10, 0), SASS, PTX, driver_version=13000, cuda_version="13.1")
    assert "compute_90 PTX" in msg and "CUDA 13.0" in msg and "CUDA 13.1" in msg
    assert _cuda_arch.problem((10, 0), SASS, PTX, driver_version=13010, cuda_version="13.1") is None
    # SASS needs no JIT: the same driver serves an sm_90 GPU
    assert _cuda_arch.problem((9, 0), SASS, PTX, driver_version=13000, cuda_version="13.1") is None


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0, to reach the cuda backend's device check
    without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.skipif(_ext._C is None or not _ext._C.has_cuda,
                    reason="fastdistill._C was built without CUDA kernels")
def test_cuda_backend_checks_the_gpu_on_first_use(monkeypatch):
    from fastdistill.backends import cuda_backend
    monkeypatch.setattr(_cuda_arch, "_served", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla P4")
    s = torch.randn(2, 8).as_subclass(_FakeCudaTensor)
    with pytest.raises(fd.BackendUnavailableError, match=r"cuda:0, Tesla P4 \(sm_61\)") as e:
        cuda_backend.feature_forward(s, s, None, 0, torch.ones(()), False)
    built = _ext._C.build_info()
    assert _cuda_arch.holdings(built["cuda_sass"], built["cuda_ptx"]) in str(e.value)
    # a GPU the build serves passes the check once and is not asked again
    calls, arch = [], built["cuda_sass"][0]
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i=None: calls.append(i) or (arch // 10, arch % 10))
    monkeypatch.setattr(_ext._C, "cuda_driver_version", lambda: 0, raising=False)
    _cuda_arch.require(torch.device("cuda", 0))
    _cuda_arch.require(torch.device("cuda", 0))
    assert calls == [0]
