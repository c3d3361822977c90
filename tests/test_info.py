"""`python -m fastdistill.info`, the report users paste into bug reports; and importing
fastdistill never touches a GPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _info(*args):
    out = subprocess.run([sys.executable, "-m", "fastdistill.info", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def report():
    return _info()


def test_report_names_versions(report):
    import triton
    lines = report.splitlines()
    assert lines[0].startswith(f"fastdistill  {fd.__version__}  ({os.path.join(ROOT, 'fastdistill')})")
    assert f"python       {sys.version.split()[0]} " in report
    assert f"torch        {torch.__version__} " in report
    assert f"triton       {triton.__version__}" in report


@pytest.mark.skipif(_ext._C is None, reason="fastdistill._C is not built")
def test_report_shows_the_build_as_the_extension_reports_it(report):
    b = _ext._C.build_info()
    assert f"extension    {_ext._C.__file__}" in report
    assert f"compiled for {', '.join(b['cpu_isas'])}; this CPU runs {_ext._C.cpu_isa()}" in report
    assert f"  cxx flags  {b['cxx_flags']}" in report and "-ffp-contract=off" in report
    if b["cuda"]:
        archs = (f"CUDA {b['cuda_version']} (cudart static): SASS "
                 + " ".join(f"sm_{a}" for a in b["cuda_sass"]) + "; PTX "
                 + (" ".join(f"compute_{a}" for a in b["cuda_ptx"]) or "none"))
        assert archs in report
        assert f"  nvcc flags {b['nvcc_flags']}" in report


def test_report_lists_every_backend_and_why_not(report):
    rows = [line.split(None, 3) for line in report.splitlines() if line.startswith("  cpu tensors")]
    assert {r[2] for r in rows} == {"cpu", "cuda", "triton", "torch"}, rows
    by_name = {r[2]: r[3] for r in rows}
    assert by_name["torch"] == "yes"
    assert by_name["cpu"] == ("yes" if _ext._C is not None else f"no: {_ext.unavailable_reason()}")
    assert by_name["cuda"].startswith("no: the cuda backend runs on CUDA tensors")
    if not torch.cuda.is_available():
        assert "gpus         none visible" in report
        assert "cuda tensors  all     no: no CUDA device visible" in report


def test_json_report_matches_the_extension():
    info = json.loads(_info("--json"))
    assert info["fastdistill"]["version"] == fd.__version__
    assert info["torch"]["version"] == torch.__version__
    if _ext._C is not None:
        b = _ext._C.build_info()
        assert {k: info["extension"][k] for k in b} == b
        assert info["backends"]["cpu tensors"]["cpu"] == {"available": True, "why": None}
    # under TRITON_INTERPRET=1 (set for these tests) the triton backend serves CPU tensors
    assert info["environment"].get("TRITON_INTERPRET") == os.environ.get("TRITON_INTERPRET")


def test_importing_fastdistill_probes_no_gpu():
    """Every module of the package imports with torch.cuda's device queries made to fail. The
    trainer libraries the integrations build on (transformers, TRL) probe at their own import:
    they are imported first, before the queries fail."""
    script = r"""
import pkgutil, importlib, torch, torch.cuda
for lib, attrs in (("transformers", ("Trainer",)), ("trl", ("DistillationTrainer",)),
                   ("trl.experimental.gkd", ("GKDTrainer",)),
                   ("trl.experimental.gold", ("GOLDTrainer",))):
    try:
        m = importlib.import_module(lib)
        [getattr(m, a) for a in attrs]
    except ImportError:
        pass
def probe(*a, **k):
    raise AssertionError("a GPU was probed at import time")
for name in ("is_available", "device_count", "get_device_capability", "get_device_properties",
             "get_device_name", "current_device", "init", "_lazy_init", "synchronize"):
    setattr(torch.cuda, name, probe)
torch._C._cuda_getDeviceCount = probe
import fastdistill
names = [m.name for m in pkgutil.walk_packages(fastdistill.__path__, "fastdistill.")]
for name in names:
    importlib.import_module(name)
assert "fastdistill.info" in names and "fastdistill.backends.cuda_backend" in names, names
print(len(names))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 20
