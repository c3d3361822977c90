"""Can the CUDA kernels inside fastdistill._C run on a given GPU?

Checked on the first use of the cuda backend on each device (never at import), so that a GPU the
binary cannot serve gets an error naming its architecture and what the binary holds, instead of
CUDA's "no kernel image is available for execution on the device" from inside a launch.

CUDA's rules, which :func:`kernel_image` applies:

* SASS (machine code) for sm_XY runs on GPUs of compute capability X.Z with Z >= Y: the same
  major version only (sm_80 serves sm_80, sm_86, sm_89; sm_90 serves sm_90);
* PTX for compute_XY is compiled by the driver, on first load, for any GPU of capability X.Y or
  newer (compute_90 serves sm_90, sm_100, sm_120, ...), provided the driver knows the PTX
  version: it must support at least the CUDA version that built it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastdistill.backends import BackendUnavailableError, _ext


def kernel_image(capability: Tuple[int, int], sass: Sequence[int], ptx: Sequence[int]
                 ) -> Optional[str]:
    """The image a GPU of ``capability`` (major, minor) runs, given the SASS and PTX
    architectures in the binary (e.g. [80, 90] and [90]): "sm_80 SASS" or "compute_90 PTX (JIT)",
    or None when none of them can run on it."""
    major, minor = capability
    fits = [a for a in sass if a // 10 == major and a % 10 <= minor]
    if fits:
        return f"sm_{max(fits)} SASS"
    jit = [a for a in ptx if a <= 10 * major + minor]
    if jit:
        return f"compute_{max(jit)} PTX (JIT)"
    return None


def holdings(sass: Sequence[int], ptx: Sequence[int]) -> str:
    """What the binary holds, in words: "SASS for sm_80, sm_90 and PTX for compute_90"."""
    return ("SASS for " + (", ".join(f"sm_{a}" for a in sass) or "no architecture") + " and PTX "
            "for " + (", ".join(f"compute_{a}" for a in ptx) or "no architecture"))


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def problem(capability: Tuple[int, int], sass: Sequence[int], ptx: Sequence[int], *,
            device: str = "this GPU", driver_version: int = 0, cuda_version: str = ""
            ) -> Optional[str]:
    """Why the binary's kernels cannot run on a GPU of ``capability``, or None when they can.
    ``driver_version``: what the driver supports (cudaDriverGetVersion, e.g. 13000; 0 unknown);
    ``cuda_version``: the CUDA version that built the binary ("13.0"; "" unknown)."""
    arch = f"sm_{10 * capability[0] + capability[1]}"
    image = kernel_image(capability, sass, ptx)
    if image is None:
        return (f"the CUDA kernels of fastdistill._C cannot run on {device} ({arch}): the binary "
                f"holds {holdings(sass, ptx)}, and SASS runs only on the same major architecture "
                f"(sm_80 on sm_80..sm_89) while PTX runs only on its architecture or newer. Use "
                f"backend='triton' (compiled for the GPU at run time) or backend='torch', or "
                f"build fastdistill from source with FASTDISTILL_CUDA_ARCHS="
                f"\"{10 * capability[0] + capability[1]}\"")
    if driver_version and cuda_version:
        built = tuple(int(x) for x in cuda_version.split(".")[:2])
        have = (driver_version // 1000, driver_version % 1000 // 10)
        if have[0] < built[0]:
            return (f"the NVIDIA driver supports CUDA {_version(driver_version)}, but "
                    f"fastdistill._C was built with CUDA {cuda_version} and needs a driver for "
                    f"CUDA {built[0]}.0 or newer; update the driver, or use backend='triton' or "
                    f"backend='torch'")
        if image.endswith("(JIT)") and have < built:
            return (f"{device} ({arch}) runs fastdistill._C's {image.split()[0]} PTX, which the "
                    f"driver must compile, but the driver supports CUDA "
                    f"{_version(driver_version)} and the PTX comes from CUDA {cuda_version}; "
                    f"update the driver, or use backend='triton' or backend='torch'")
    return None


_served = set()  # device indices already checked


def require(device: torch.device) -> None:
    """Raises BackendUnavailableError when the cuda backend cannot run on ``device``; checks
    each device once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _served:
        return
    info = _ext._C.build_info()
    why = problem(torch.cuda.get_device_capability(index), info["cuda_sass"], info["cuda_ptx"],
                  device=f"cuda:{index}, {torch.cuda.get_device_name(index)}",
                  driver_version=_ext._C.cuda_driver_version(),
                  cuda_version=info["cuda_version"] or "")
    if why:
        raise BackendUnavailableError(f"backend='cuda' is unavailable: {why}")
    _served.add(index)
