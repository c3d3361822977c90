"""The release configuration, checked as far as this machine can (no Docker, no GitHub): the
cibuildwheel configuration in pyproject.toml against cibuildwheel itself, the wheels workflow
against the GitHub workflow schema and bash, the steps `make wheel` shares with both, and the
version written in one place."""

import json
import os
import re
import subprocess
import sys

import fastdistill as fd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
WORKFLOW = os.path.join(ROOT, ".github", "workflows", "wheels.yml")

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_cibuildwheel_builds_cpython_3_9_to_3_13_on_x86_64_and_aarch64():
    ids = _run([os.path.join(BIN, "cibuildwheel"), "--print-build-identifiers", "--platform",
                "linux"]).split()
    assert sorted(ids) == sorted(f"cp3{v}-manylinux_{arch}" for v in range(9, 14)
                                 for arch in ("x86_64", "aarch64"))


def test_cibuildwheel_configuration_is_valid_and_its_scripts_exist():
    import jsonschema
    import cibuildwheel
    schema_path = os.path.join(os.path.dirname(cibuildwheel.__file__), "resources",
                               "cibuildwheel.schema.json")
    with open(schema_path) as f:
        schema = json.load(f)
    cfg = _pyproject()["tool"]["cibuildwheel"]
    jsonschema.validate(cfg, schema)
    assert cfg["manylinux-x86_64-image"] == cfg["manylinux-aarch64-image"] == "manylinux_2_28"
    assert cfg["environment"]["FASTDISTILL_CUDA_ARCHS"] == "80;90+PTX"
    commands = " ".join([cfg["before-all"], cfg["repair-wheel-command"], cfg["test-command"]])
    scripts = re.findall(r"\{project\}/(scripts/\S+)", commands)
    assert sorted(scripts) == ["scripts/install_cuda.sh", "scripts/repair_wheel.py",
                               "scripts/smoke_wheel.py"]
    for s in scripts:
        assert os.access(os.path.join(ROOT, s), os.X_OK), s
    _run(["bash", "-n", os.path.join(ROOT, "scripts", "install_cuda.sh")])


def test_make_wheel_runs_the_same_steps():
    """The Makefile's wheel target repairs with the script cibuildwheel runs and tests the result
    with the smoke test cibuildwheel runs (through check_wheel.py)."""
    make = _run(["make", "-n", "wheel", "STAMP=/dev/null"])
    assert "pip wheel" in make
    assert "scripts/repair_wheel.py -w dist" in make
    assert "scripts/check_wheel.py" in make
    with open(os.path.join(ROOT, "scripts", "check_wheel.py")) as f:
        assert '"smoke_wheel.py"' in f.read()


def test_workflow_validates_against_the_github_schema():
    _run([os.path.join(BIN, "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
          WORKFLOW])


def _workflow():
    from ruamel.yaml import YAML
    with open(WORKFLOW) as f:
        return YAML(typ="safe").load(f)


def test_workflow_shell_steps_parse_and_jobs_are_wired():
    wf = _workflow()
    jobs = wf["jobs"]
    assert set(jobs) == {"sdist", "wheels", "test", "publish"}
    runs = [step["run"] for job in jobs.values() for step in job["steps"] if "run" in step]
    assert runs
    for script in runs:  # ${{ }} is expanded by GitHub before bash sees the script
        out = subprocess.run(["bash", "-n"], input=re.sub(r"\$\{\{[^}]*\}\}", "x", script),
                             capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
    archs = {m["arch"] for m in jobs["wheels"]["strategy"]["matrix"]["include"]}
    assert archs == {"x86_64", "aarch64"}
    assert "cibuildwheel==" in " ".join(runs)
    assert jobs["test"]["needs"] == "wheels"
    torches = {m["torch"] for m in jobs["test"]["strategy"]["matrix"]["include"]}
    assert "torch==2.4.1" in torches  # the oldest torch the package claims (torch>=2.4)
    assert _pyproject()["project"]["dependencies"] == ["torch>=2.4"]
    publish = jobs["publish"]
    assert set(publish["needs"]) == {"sdist", "wheels", "test"}
    assert "refs/tags/v" in publish["if"]
    assert publish["permissions"] == {"id-token": "write"}
    assert publish["steps"][-1]["uses"].startswith("pypa/gh-action-pypi-publish@")


def test_version_is_written_in_one_place():
    from fastdistill._version import __version__
    assert fd.__version__ == __version__
    assert _pyproject()["project"]["dynamic"] == ["version"]
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert __version__ not in f.read()
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        first = re.search(r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", f.read(), re.M)
    assert first and first.group(1) == __version__, "CHANGELOG.md's latest entry"
