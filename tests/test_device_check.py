"""bench/device_check.sh runs every step on this GPU-less machine, in a copy of the checkout (the
build step builds in place): a failed build is recorded and the later steps still run, the GPU
tests and benchmarks are skipped with the reason, and summary.md says what passed, failed, was
skipped and was not reached. Small time limits keep it cheap."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _copy_checkout(dst):
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in files.stdout.splitlines():
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def _table(summary):
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("build", "test", "bench"):
            rows[(cells[0], cells[1])] = (cells[2], cells[4])
    return rows


def test_every_step_runs_here_and_reports(tmp_path):
    repo, results = tmp_path / "repo", tmp_path / "results"
    _copy_checkout(str(repo))
    env = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_STEP_SECONDS="120",  # a cap: items end sooner
               FASTDISTILL_CUDA_ARCHS="bogus",  # a build that fails at once
               CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", "bench/device_check.sh", "all", str(results)], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    summary = (results / "summary.md").read_text()
    assert p.returncode == 1, (p.returncode, p.stdout[-3000:], p.stderr[-2000:])
    rows = _table(summary)
    assert rows[("build", "extension (sm_bogus)")][0] == "FAILED"
    assert "cannot read" in rows[("build", "extension (sm_bogus)")][1]
    assert rows[("build", "environment")][0] == "passed"
    assert rows[("build", "import check")][0] == "passed"  # the package works without the build
    tests = [k for k in rows if k[0] == "test"]
    assert len(tests) == 3
    for k in tests:  # not "not reached": the test step ran after the failed build
        assert rows[k][0] == "skipped" and "no CUDA device" in rows[k][1], (k, rows[k])
        assert "gpu-marked tests collected" in rows[k][1]
    bench = [k for k in rows if k[0] == "bench"]
    assert len(bench) == 6
    assert rows[("bench", "model: roofline sm_90")][0] in ("passed", "TIMED OUT")
    for k in bench:
        if "model" not in k[1]:
            assert rows[k][0] == "skipped", (k, rows[k])
    assert "device: no CUDA device" in summary
    assert (results / "build-extension_sm_bogus_.log").exists()
    assert len((results / "status.tsv").read_text().splitlines()) >= 12


def test_usage():
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "device_check.sh")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: bench/device_check.sh build|test|bench|all" in p.stderr
