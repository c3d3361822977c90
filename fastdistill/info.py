"""What this installation of fastdistill is and can do; paste the output into bug reports.

    python -m fastdistill.info          # text
    python -m fastdistill.info --json   # the same as JSON

Version and location, Python, torch and triton, how fastdistill._C was built (its own report,
``_C.build_info()``: compiler, flags, host ISA variants and the one this CPU runs, CUDA version,
SASS and PTX architectures), the NVIDIA driver, each visible GPU and which kernel image it would
run, and each backend: available or why not. This command looks at the GPUs; importing
fastdistill never does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict

ENV_VARS = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "FASTDISTILL_BUILD_EXT", "FASTDISTILL_CUDA",
            "FASTDISTILL_CUDA_ARCHS")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def collect() -> Dict[str, Any]:
    """Everything the report shows, as plain data. Never raises: a part that fails to load
    reports its error instead."""
    import torch

    import fastdistill
    from fastdistill import backends
    from fastdistill.backends import _cuda_arch, _ext

    info: Dict[str, Any] = {
        "fastdistill": {"version": fastdistill.__version__,
                        "path": os.path.dirname(os.path.abspath(fastdistill.__file__))},
        "python": {"version": sys.version.split()[0], "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "path": os.path.dirname(torch.__file__)},
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    try:
        import triton
        info["triton"] = {"version": triton.__version__}
    except Exception as e:  # noqa: BLE001 (a report, not a check)
        info["triton"] = {"version": None, "error": _error(e)}

    build: Dict[str, Any] = {}
    if _ext._C is None:
        info["extension"] = {"loaded": False, "error": _ext.LOAD_ERROR, "cuda_sass": [],
                             "cuda_ptx": []}
    else:
        build = dict(_ext._C.build_info())
        info["extension"] = {"loaded": True, "path": _ext._C.__file__, **build}

    driver = 0
    if build.get("cuda"):
        try:
            driver = int(_ext._C.cuda_driver_version())
        except Exception as e:  # noqa: BLE001
            info["cuda_driver_error"] = _error(e)
    info["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}" if driver else None

    gpus = []
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i in range(count):
            cap = torch.cuda.get_device_capability(i)
            gpu = {"index": i, "name": torch.cuda.get_device_name(i), "arch": f"sm_{cap[0]}{cap[1]}"}
            if build.get("cuda"):
                gpu["kernel_image"] = _cuda_arch.kernel_image(cap, build["cuda_sass"],
                                                              build["cuda_ptx"])
                gpu["problem"] = _cuda_arch.problem(
                    cap, build["cuda_sass"], build["cuda_ptx"], device=f"cuda:{i}",
                    driver_version=driver, cuda_version=build.get("cuda_version") or "")
            gpus.append(gpu)
    except Exception as e:  # noqa: BLE001
        info["gpus_error"] = _error(e)
    info["gpus"] = gpus

    table: Dict[str, Dict[str, Any]] = {}
    devices = [("cpu tensors", torch.device("cpu"))]
    if gpus:
        devices.append(("cuda tensors", torch.device("cuda", 0)))
    for label, device in devices:
        row = {}
        for name in ("cpu", "cuda", "triton", "torch"):
            try:
                ok, why = backends.check(name, device)
            except Exception as e:  # noqa: BLE001
                ok, why = False, _error(e)
            if ok and name == "cuda" and gpus and gpus[0].get("problem"):
                ok, why = False, gpus[0]["problem"]
            row[name] = {"available": ok, "why": why or None}
        table[label] = row
    if not gpus:
        table["cuda tensors"] = {"all": {"available": False,
                                         "why": "no CUDA device visible (torch.cuda.is_available()"
                                                f" is {torch.cuda.is_available()})"}}
    info["backends"] = table
    return info


def _archs(build: Dict[str, Any]) -> str:
    if not build.get("cuda"):
        return "no CUDA kernels (built without nvcc, or FASTDISTILL_CUDA=0)"
    sass = " ".join(f"sm_{a}" for a in build["cuda_sass"]) or "none"
    ptx = " ".join(f"compute_{a}" for a in build["cuda_ptx"]) or "none"
    return f"CUDA {build['cuda_version']} (cudart {build['cudart']}): SASS {sass}; PTX {ptx}"


def format_text(info: Dict[str, Any]) -> str:
    ext = info["extension"]
    lines = [
        f"fastdistill  {info['fastdistill']['version']}  ({info['fastdistill']['path']})",
        f"python       {info['python']['version']} ({info['python']['implementation']}, "
        f"{info['platform']['system']})",
        f"torch        {info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none'})",
        f"triton       {info['triton']['version'] or 'not available: ' + info['triton']['error']}",
    ]
    if ext["loaded"]:
        lines += [
            f"extension    {ext['path']}",
            f"  built      fastdistill {ext['version']}, {ext['compiler']}, {ext['machine']}, "
            f"Python {ext['python']} headers, pybind11 {ext['pybind11']}, OpenMP {ext['openmp']}",
            f"  host ISA   compiled for {', '.join(ext['cpu_isas'])}; this CPU runs "
            f"{ext['cpu_isa']}",
            f"  CUDA       {_archs(ext)}",
            f"  cxx flags  {ext['cxx_flags']}",
        ]
        if ext["cuda"]:
            lines.append(f"  nvcc flags {ext['nvcc_flags']}")
        lines.append(f"  ld flags   {ext['ld_flags']}")
        if ext["cuda"]:
            lines.append("driver       " + (f"supports CUDA {info['cuda_driver']}"
                                            if info["cuda_driver"] else "no NVIDIA driver found"))
    else:
        lines.append(f"extension    not loaded: {ext['error']}")
    if info.get("gpus_error"):
        lines.append(f"gpus         error: {info['gpus_error']}")
    elif not info["gpus"]:
        lines.append("gpus         none visible")
    for gpu in info["gpus"]:
        runs = ("" if "kernel_image" not in gpu else
                f": {gpu['problem']}" if gpu["problem"] else f": runs the {gpu['kernel_image']}")
        lines.append(f"gpu {gpu['index']:<8} {gpu['name']} ({gpu['arch']}){runs}")
    lines.append("backends")
    for label, row in info["backends"].items():
        for name, state in row.items():
            lines.append(f"  {label:<13} {name:<7} " + ("yes" if state["available"] else
                                                         f"no: {state['why']}"))
    if info["environment"]:
        lines.append("environment  " + " ".join(f"{k}={v}" for k, v in info["environment"].items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastdistill.info",
                                 description="Report this fastdistill installation (for bug "
                                             "reports).")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))


if __name__ == "__main__":
    main()
