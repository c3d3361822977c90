"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (bf16 and fp32 inputs, the
V = 128256 / D = 4096 configurations) on this GPU-less machine, without register spills and with
128-bit global loads. Runs tests/aot_compile.py in processes without TRITON_INTERPRET."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton not installed")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def usage(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path_factory.mktemp("aot")
    procs = []
    for arch in (80, 90):  # one process per architecture: they run in parallel
        path = out / f"sm{arch}.json"
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "aot_compile.py"), "--arch",
                              str(arch), "--json", str(path)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        procs.append((p, path))
    results = []
    for p, path in procs:
        log = p.communicate()[0]
        assert p.returncode == 0, log[-4000:]
        results += json.loads(path.read_text())
    return results


def test_every_kernel_compiled_for_both_archs(usage):
    names = {r["name"] for r in usage}
    assert any(n.startswith("distill[") for n in names)
    assert any(n.startswith("feature[") for n in names)
    for n in names:
        assert {r["arch"] for r in usage if r["name"] == n} == {80, 90}, n


def test_no_spills(usage):
    bad = [(r["name"], r["arch"], r["local"], r["stack"]) for r in usage
           if r["local"] != 0 or r["stack"] != 0]
    assert not bad, f"kernels using local memory (spills): {bad}"


STREAMING = ("distill[", "feature[", "scale_rows[", "linear_stats[", "linear_grad[")


def test_vectorised_loads(usage):
    """The kernels that stream big tensors load 128 bits at a time (linear_finish reads a few
    floats per row and is exempt)."""
    scalar = [(r["name"], r["arch"]) for r in usage
              if r["name"].startswith(STREAMING) and not r["ldg128"]]
    assert not scalar, f"kernels without 128-bit global loads: {scalar}"


def test_fused_linear_uses_tensor_cores(usage):
    """bf16 fused linear kernels: HMMA on sm_80, warpgroup HGMMA on sm_90."""
    fused = [r for r in usage if r["name"].startswith(("linear_stats[", "linear_grad["))]
    assert fused
    for r in fused:
        assert (r["hmma"] if r["arch"] == 80 else r["hgmma"]), (r["name"], r["arch"])
