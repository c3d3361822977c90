"""The release wheel, made the way `make wheel` and cibuildwheel make it (pip wheel, then
scripts/repair_wheel.py): a manylinux wheel that auditwheel accepts, that links and bundles
nothing of torch, Python or the CUDA driver, holds SASS for sm_80 and sm_90 and compute_90 PTX
(read with cuobjdump), carries its license and metadata, and in a fresh environment beside this
torch computes forward and backward on the cpu and torch backends and reports its build through
`python -m fastdistill.info` (scripts/check_wheel.py, which runs scripts/smoke_wheel.py)."""

import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
import repair_wheel  # noqa: E402

# what a manylinux wheel may link: the system libraries of the policy, and the libgomp that
# auditwheel copies in (renamed with a hash)
ALLOWED = re.compile(r"^(libc\.so\.6|libm\.so\.6|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libdl\.so\.2|"
                     r"librt\.so\.1|libpthread\.so\.0|ld-linux-[\w-]+\.so\.\d|"
                     r"libgomp-[0-9a-f]+\.so\.[\d.]+)$")

if _ext._C is None:
    pytest.skip(f"fastdistill._C is not built here: {_ext.LOAD_ERROR}", allow_module_level=True)


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """(repaired wheel, repair_wheel.py's output, folder with its contents unpacked). Built from
    this checkout, reusing its compiled objects (only the link runs again)."""
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
          str(tmp / "raw"), ROOT], cwd=ROOT)
    (raw,) = (tmp / "raw").glob("fastdistill-*.whl")
    report = _run([sys.executable, os.path.join(SCRIPTS, "repair_wheel.py"), "-w",
                   str(tmp / "dist"), str(raw)])
    repaired = report.strip().splitlines()[-1]
    assert os.path.dirname(repaired) == str(tmp / "dist")
    zipfile.ZipFile(repaired).extractall(tmp / "unpacked")
    return repaired, report, tmp / "unpacked"


def test_manylinux_tag_accepted_by_auditwheel(wheel):
    path, report, _ = wheel
    m = re.fullmatch(rf"fastdistill-{re.escape(fd.__version__)}-(cp3\d+)-(cp3\d+)-"
                     r"manylinux_2_(\d+)_(x86_64|aarch64)\.whl", os.path.basename(path))
    assert m, path
    assert m.group(1) == f"cp3{sys.version_info[1]}"
    show = " ".join(_run([os.path.join(os.path.dirname(sys.executable), "auditwheel"), "show",
                          path]).split())
    assert (f'is consistent with the following platform tag: "manylinux_2_{m.group(3)}_'
            f'{m.group(4)}"') in show
    assert "wheel size:" in report and "largest members" in report


def test_links_and_bundles_nothing_of_torch_python_or_cuda(wheel):
    _, _, unpacked = wheel
    libs = sorted(p for p in unpacked.rglob("*.so*") if p.is_file())
    bundled = [p.name for p in libs if p.parent.name == "fastdistill.libs"]
    assert all(n.startswith("libgomp-") for n in bundled), bundled
    ext = [p for p in libs if p.parent.name == "fastdistill" and p.name.startswith("_C.")]
    assert len(ext) == 1, libs
    for lib in libs:
        out = _run(["readelf", "-d", str(lib)])
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
        assert all(ALLOWED.match(n) for n in needed), (lib.name, needed)
    assert repair_wheel.check_links(wheel[0]) == []


def test_link_check_catches_torch_and_exported_cuda_runtime(tmp_path):
    """repair_wheel.check_links on a wheel whose module links a torch library and exports a
    CUDA runtime function (built here from two tiny C files)."""
    (tmp_path / "t.c").write_text("int torch_thing(void) { return 1; }\n")
    (tmp_path / "c.c").write_text("int torch_thing(void);\n"
                                  "int cudaMalloc(void) { return torch_thing(); }\n")
    _run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libtorch_cpu.so"), str(tmp_path / "t.c")])
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    _run(["cc", "-shared", "-fPIC", "-o", str(so), str(tmp_path / "c.c"), f"-L{tmp_path}",
          "-ltorch_cpu"])
    whl = tmp_path / "fastdistill-0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(so, f"fastdistill/{so.name}")
    problems = repair_wheel.check_links(str(whl))
    assert f"fastdistill/{so.name} links libtorch_cpu.so" in problems
    assert f"fastdistill/{so.name} exports cudaMalloc" in problems


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    assert os.access(path, os.X_OK), f"no cuobjdump in the triton wheel at {path}"
    return path


@pytest.mark.skipif(not _ext._C.has_cuda, reason="fastdistill._C was built without CUDA kernels")
def test_wheel_holds_sass_for_each_arch_and_ptx(wheel):
    """cuobjdump on the module inside the wheel: one cubin per CUDA source and SASS
    architecture, one PTX per source and PTX architecture, and _C.build_info() says the same."""
    _, _, unpacked = wheel
    (so,) = (unpacked / "fastdistill").glob("_C.*.so")
    elf = re.findall(r"ELF file\s+\d+: (\w+)\.sm_(\d+)\.cubin", _run([_cuobjdump(), "--list-elf",
                                                                       str(so)]))
    ptx = re.findall(r"PTX file\s+\d+: (\w+)\.sm_(\d+)\.ptx", _run([_cuobjdump(), "--list-ptx",
                                                                     str(so)]))
    sources = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
               if f.endswith(".cu")}
    b = _ext._C.build_info()
    assert sorted(elf) == sorted((s, str(a)) for s in sources for a in b["cuda_sass"])
    assert sorted(ptx) == sorted((s, str(a)) for s in sources for a in b["cuda_ptx"])
    if "FASTDISTILL_CUDA_ARCHS" not in os.environ:
        assert {a for _, a in elf} == {"80", "90"} and {a for _, a in ptx} == {"90"}


def test_license_and_metadata(wheel):
    _, _, unpacked = wheel
    (info,) = unpacked.glob("fastdistill-*.dist-info")
    license_text = (info / "licenses" / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    meta = (info / "METADATA").read_text()
    headers = dict(re.findall(r"^(Version|License-Expression|Requires-Python): (.+)$", meta, re.M))
    assert headers == {"Version": fd.__version__, "License-Expression": "Apache-2.0",
                       "Requires-Python": ">=3.9"}
    assert re.findall(r"^Requires-Dist: (.+)$", meta, re.M)[0] == "torch>=2.4"
    classifiers = re.findall(r"^Classifier: (.+)$", meta, re.M)
    for v in range(9, 14):
        assert f"Programming Language :: Python :: 3.{v}" in classifiers
    assert "Environment :: GPU :: NVIDIA CUDA" in classifiers
    urls = dict(re.findall(r"^Project-URL: ([^,]+), (\S+)$", meta, re.M))
    assert {"Homepage", "Source", "Changelog", "Issues"} <= set(urls), urls


def test_wheel_in_a_fresh_environment_beside_this_torch(wheel):
    out = _run([sys.executable, os.path.join(SCRIPTS, "check_wheel.py"), wheel[0]])
    assert out.startswith(f"smoke ok: fastdistill {fd.__version__} from ")
    assert f"torch {torch.__version__}," in out
    b = _ext._C.build_info()
    if b["cuda"]:
        assert (f"CUDA {b['cuda_version']}: SASS " + " ".join(f"sm_{a}" for a in b["cuda_sass"])
                + ", PTX " + " ".join(f"compute_{a}" for a in b["cuda_ptx"])) in out
