"""Compiled code without a GPU: every Triton kernel compiled ahead of time for a real target
(sm_80, sm_90), and the CUDA kernels of the built extension, read with the cuobjdump that ships
in the triton wheel.

Where the compile specs come from. Nothing here types a kernel signature. Each *workload* runs
a launcher the way the package runs it (the triton backend's ``distill_forward`` and
``feature_forward``, the scale kernel of backward, and the public ``linear_distill_loss`` in
fused mode, forward and backward) on ``meta`` tensors at a benchmark shape, with
``JITFunction.run`` replaced by a recorder: every kernel a launcher starts is captured with the
arguments, grid and launch options it really passes, and turned into a signature, constexprs
and divisibility attributes by Triton's own JIT binder (``create_function_from_signature`` +
``_pack_args``, what ``JITFunction.run`` does before it compiles), for the GPU target asked for.
A launcher that gains an argument, a kernel that changes its tile or a new kernel is picked up
without any edit here. Meta tensors have data pointer 0, i.e. 16-byte aligned like every
allocation of the CUDA caching allocator, so pointers get the divisibility hint a real launch
gets.

Run in a process without TRITON_INTERPRET (an interpreted kernel cannot be compiled):

    python -m fastdistill.bench.aot [--arch 80 90] [--json out.json] [--filter distill]

prints registers, spills, load width and the matrix instructions of every kernel.
``fastdistill.bench.roofline`` and ``tests/test_aot.py`` use :func:`compile_all`, whose records
(resource usage and the SASS text) are cached in a directory keyed by the kernel's source hash,
its specialisation and the triton version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

# ---- cuobjdump -----------------------------------------------------------------------------------


def nvidia_bin(tool: str) -> str:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm): the triton wheel's first, then the
    toolkit's."""
    candidates = []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", tool))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", tool))
    candidates.append(shutil.which(tool) or "")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{tool} not found (it ships in the triton wheel, "
                            f"triton/backends/nvidia/bin, and in the CUDA toolkit)")


def _cuobjdump(args: List[str], path: str) -> str:
    out = subprocess.run([nvidia_bin("cuobjdump"), *args, path], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} {path} failed: {out.stderr.strip()}")
    return out.stdout


def _on_cubin(cubin: bytes, args: List[str]) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _cuobjdump(args, f.name)


_USAGE = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> Dict[str, Dict[str, Any]]:
    """{function: {"arch", "reg", "stack", "shared", "local"}} from --dump-resource-usage."""
    out, arch, func = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            f = {k: int(v) for k, v in _USAGE.findall(line)}
            out[f"{arch}:{func}"] = {"arch": arch, "function": func, "reg": f["REG"],
                                     "stack": f["STACK"], "shared": f["SHARED"],
                                     "local": f["LOCAL"]}
            func = None
    return out


def compact_sass(text: str) -> Dict[str, str]:
    """{function: SASS} from --dump-sass, keeping one 'ADDR: INSTRUCTION' line per instruction
    (the encodings and headers dropped), e.g. '0470: @P0 BRA 0x4b0'."""
    funcs, cur, lines = {}, None, []
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if cur is not None:
                funcs[cur] = "\n".join(lines)
            cur, lines = m.group(1), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            lines.append(f"{m.group(1)}: {m.group(2)}")
    if cur is not None:
        funcs[cur] = "\n".join(lines)
    return funcs


def extension_kernels(so_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """The CUDA kernels of the built extension: one record per (arch, function) with the
    resource usage and the compact SASS. [] when the module was built without CUDA."""
    if so_path is None:
        from fastdistill.backends import _ext
        if _ext._C is None or not getattr(_ext._C, "has_cuda", False):
            return []
        so_path = _ext._C.__file__
    usage = parse_resource_usage(_cuobjdump(["--dump-resource-usage"], so_path))
    threads = max_threads(_cuobjdump(["--dump-elf"], so_path))
    records = []
    arch = None
    text = _cuobjdump(["--dump-sass"], so_path)
    # the SASS dump is one block per cubin ("code for sm_XX"), functions inside
    blocks = re.split(r"(?m)^\s*code for sm_(\d+)\s*$", text)
    for i in range(1, len(blocks), 2):
        arch = int(blocks[i])
        for func, sass in compact_sass(blocks[i + 1]).items():
            u = usage.get(f"{arch}:{func}")
            if u is None or not sass:
                continue
            records.append(dict(u, name=func, backend="cuda", sass=sass,
                                max_threads=threads.get(f"{arch}:{func}")))
    return records


def max_threads(elf_text: str) -> Dict[str, int]:
    """{"arch:function": threads} from the EIATTR_MAX_THREADS attribute of each function's
    .nv.info section (its __launch_bounds__), in a cuobjdump --dump-elf listing."""
    out, arch, func, want = {}, None, None, False
    for line in elf_text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        if line.startswith(".nv.info."):
            func = line[len(".nv.info."):].strip()
            continue
        if "EIATTR_MAX_THREADS" in line:
            want = True
            continue
        if want and "Value:" in line:
            want = False
            v = re.search(r"Value:\s*(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", line)
            if v and func:
                out[f"{arch}:{func}"] = int(v.group(1), 16) * int(v.group(2), 16) * \
                    int(v.group(3), 16)
    return out


# ---- capture: what the launchers pass ----------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as a launcher made it."""
    fn: Any                    # the triton JITFunction
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    grid: Any

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    def bound(self) -> Dict[str, Any]:
        """Parameter name -> value (defaults applied)."""
        params = [k for k in self.fn.signature.parameters]
        b = self.fn.signature.bind_partial(*self.args,
                                           **{k: v for k, v in self.kwargs.items()
                                              if k in params})
        b.apply_defaults()
        return dict(b.arguments)

    def options(self) -> Dict[str, Any]:
        params = set(self.fn.signature.parameters)
        return {k: v for k, v in self.kwargs.items() if k not in params}

    def grid_size(self) -> Tuple[int, ...]:
        g = self.grid(self.bound()) if callable(self.grid) else self.grid
        return tuple(int(x) for x in g)


@contextlib.contextmanager
def target_capability(arch: int) -> Iterator[None]:
    """Within the block, launchers that choose a kernel by the device's compute capability
    (kernels/distill.py: the row kernel needs clusters, sm_90) see sm_`arch` for tensors that
    are not on a CUDA device."""
    from fastdistill.kernels import distill
    original = distill.VIRTUAL_CAPABILITY
    distill.VIRTUAL_CAPABILITY = (arch // 10, arch % 10)
    try:
        yield
    finally:
        distill.VIRTUAL_CAPABILITY = original


@contextlib.contextmanager
def capture() -> Iterator[List[Launch]]:
    """Within the block, launching any Triton kernel records a :class:`Launch` instead of
    running (no GPU, no driver)."""
    from fastdistill.kernels import interpreting
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; run "
                           "in a process without it")
    from triton.runtime.jit import JITFunction

    from fastdistill import kernels
    launches: List[Launch] = []
    original, sms = JITFunction.run, kernels.VIRTUAL_MULTIPROCESSORS

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))
        return None

    JITFunction.run = record
    kernels.VIRTUAL_MULTIPROCESSORS = TARGET_SMS  # launchers size their grids for the H200
    try:
        yield launches
    finally:
        JITFunction.run = original
        kernels.VIRTUAL_MULTIPROCESSORS = sms


@contextlib.contextmanager
def _meta_is_a_gpu():
    """backends.check accepts meta tensors for the triton backend (for the public API's
    backend selection; kernels launched on them are only recorded)."""
    from fastdistill import backends
    original = backends.check

    def check(name, device):
        if name == "triton" and torch_device(device).type == "meta":
            return original(name, torch_device("cuda"))
        return original(name, device)

    backends.check = check
    try:
        yield
    finally:
        backends.check = original


def torch_device(d):
    import torch
    return torch.device(d)


# ---- workloads: the package's own calls at benchmark shapes ------------------------------------

DTYPES = ("bf16", "fp32")
TARGET_SMS = 132  # H100 / H200 SXM
N_BENCH = 8192
V_BENCH = 128256
D_BENCH = 4096
# the bench presets' loss settings (fastdistill/bench/__main__.py: labels, no hard loss, T = 1)
# and a heavier variant (hard loss, T != 1, softcaps: more live values) held to the spill budget
VARIANTS = {"bench": dict(hard_weight=0.0, temperature=1.0),
            "hard": dict(hard_weight=0.5, temperature=2.0)}


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _distill_workload(dtype, divergence, variant, V=V_BENCH):
    import torch
    from fastdistill import backends
    from fastdistill.config import DistillConfig
    dt = _torch_dtype(dtype)
    s = torch.empty(N_BENCH, V, dtype=dt, device="meta")
    t = torch.empty_like(s)
    labels = torch.empty(N_BENCH, dtype=torch.int64, device="meta")
    kw = VARIANTS[variant]
    opts = DistillConfig(divergence=divergence, beta=0.5, temperature=kw["temperature"],
                         hard_weight=kw["hard_weight"]).kernel_options()
    scale = torch.empty((), dtype=torch.float32, device="meta")
    backends.get("triton").distill_forward(s, t, labels, opts, V, scale, True)


def _scale_workload(dtype):
    """The in-place scaling of backward (fastdistill.ops.scale_grad_ calls it for CUDA
    tensors): grad_output times the gradient the forward wrote."""
    import torch

    from fastdistill.kernels.scale import scale_rows_
    g = torch.empty(N_BENCH, V_BENCH, dtype=_torch_dtype(dtype), device="meta")
    f = torch.empty((), dtype=torch.float32, device="meta")
    scale_rows_(g, f)


def _feature_workload(dtype, kind, D):
    import torch
    from fastdistill import backends
    dt = _torch_dtype(dtype)
    s = torch.empty(N_BENCH, D, dtype=dt, device="meta")
    t = torch.empty_like(s)
    mask = torch.empty(N_BENCH, dtype=torch.bool, device="meta")
    scale = torch.empty((), dtype=torch.float32, device="meta")
    backends.get("triton").feature_forward(s, t, mask, kind, scale, True)


def _linear_call(dtype, divergence, variant):
    import torch
    from fastdistill.config import DistillConfig
    from fastdistill.ops import LinearCall
    dt = _torch_dtype(dtype)
    N, V, D = N_BENCH, V_BENCH, D_BENCH
    hs = torch.empty(N, D, dtype=dt, device="meta")
    ws = torch.empty(V, D, dtype=dt, device="meta")
    ht = torch.empty(N, D, dtype=dt, device="meta")
    wt = torch.empty(V, D, dtype=dt, device="meta")
    labels = torch.empty(N, dtype=torch.int64, device="meta")
    kw = VARIANTS[variant]
    cfg = DistillConfig(divergence=divergence, beta=0.5, **kw)
    k = cfg.kernel_options()
    call = LinearCall(hs, ws, None, ht, wt, None, None, labels, k.divergence, k.beta,
                      1.0 / cfg.temperature, cfg.soft_scale, cfg.hard_weight, cfg.ignore_index,
                      V, 1.0, 1.0, 30.0 if variant == "hard" else None, None, "triton")
    scale = torch.empty((), dtype=torch.float32, device="meta")
    return call, scale


def _linear_workload(dtype, divergence, variant):
    """The fused implementation itself (backends/linear_fused.py): the custom op would route
    meta tensors to its fake kernel. Its forward computes the gradients too; backward only scales
    them by grad_output (the scale kernel, captured by _scale_workload)."""
    from fastdistill.backends import linear_fused
    call, scale = _linear_call(dtype, divergence, variant)
    with _meta_is_a_gpu():
        linear_fused.forward(call, scale, None, (True, True, False), 0)


def _linear_chunked_workload(dtype, divergence, variant):
    """The chunked implementation (backends/linear_chunked.py) on the triton backend: cuBLAS
    gives the float32 logits (not captured), the logit-level kernel turns them into the 16-bit
    gradient of the ring, and the Triton GEMM accumulates grad_weight in two 16-bit planes."""
    from fastdistill.backends import linear_chunked
    call, scale = _linear_call(dtype, divergence, variant)
    with _meta_is_a_gpu():
        linear_chunked.forward(call, scale, None, (True, True, False), 0)


# The chunked workload's logit-level kernel reads float32 logits: its records are labelled
# (op, dtype) = ("distill", "fp32") so that the model streams 4-byte elements.
CHUNKED_LABELS = {"distill_kernel": ("distill", "fp32")}


# sparse (top-k) teachers at the bench preset's K: (dtype, divergence, tail)
TOPK_K = 64
TOPK_CASES = (("bf16", "forward_kl", "bucket"), ("fp32", "forward_kl", "bucket"),
              ("bf16", "jsd", "none"), ("bf16", "reverse_kl", "renormalize"))


def _topk_workload(dtype, divergence, tail, variant):
    """The triton backend's topk_forward (fastdistill/kernels/topk.py) with the teacher as
    K = TOPK_K (index, bf16 logprob) pairs per row."""
    import torch
    from fastdistill import backends
    from fastdistill.config import TOPK_TAILS, DistillConfig
    s = torch.empty(N_BENCH, V_BENCH, dtype=_torch_dtype(dtype), device="meta")
    idx = torch.empty(N_BENCH, TOPK_K, dtype=torch.int32, device="meta")
    lp = torch.empty(N_BENCH, TOPK_K, dtype=torch.bfloat16, device="meta")
    labels = torch.empty(N_BENCH, dtype=torch.int64, device="meta")
    kw = VARIANTS[variant]
    opts = DistillConfig(divergence=divergence, beta=0.5, temperature=kw["temperature"],
                         hard_weight=kw["hard_weight"]).kernel_options()
    scale = torch.empty((), dtype=torch.float32, device="meta")
    backends.get("triton").topk_forward(s, idx, lp, labels, opts, TOPK_TAILS.index(tail),
                                        V_BENCH, scale, True)


def _extract_workload(dtype):
    """The fused temperature-softmax + top-k of fastdistill.offline (K = TOPK_K)."""
    import torch
    from fastdistill.kernels.topk import extract_topk_rows
    z = torch.empty(N_BENCH, V_BENCH, dtype=_torch_dtype(dtype), device="meta")
    extract_topk_rows(z, TOPK_K, 1.0)


@dataclass
class Workload:
    op: str                 # distill, feature, scale, linear
    dtype: str
    divergence: str         # the divergence, or the feature kind
    variant: str            # bench / hard / onetile / tiled / chunked
    run: Callable[[], None] = field(repr=False)
    labels: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # kernel -> (op, dtype)

    @property
    def label(self) -> str:
        return f"{self.divergence},{self.dtype},{self.variant}"


FEATURE_KINDS = ("mse", "cosine", "normalized_mse")
LINEAR_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "symmetric_kl")


def workloads(ops: Tuple[str, ...] = ("distill", "feature", "scale", "linear", "topk",
                                       "extract"),
              variants: Tuple[str, ...] = ("bench", "hard"),
              vocabs: Tuple[int, ...] = ()) -> List[Workload]:
    """The workloads of `ops`; `vocabs`: the logit-level bench settings at these vocabulary
    sizes too (variant "bench@V"; kernels whose code depends on V, e.g. the row kernel's tiles)."""
    from fastdistill.divergences import DIVERGENCE_CODES
    out = []
    for dtype in DTYPES:
        if "distill" in ops:
            for div in DIVERGENCE_CODES:
                for var in variants:
                    out.append(Workload("distill", dtype, div, var,
                                        lambda d=dtype, v=div, w=var: _distill_workload(d, v, w)))
                for V in vocabs:
                    if V != V_BENCH:
                        out.append(Workload(
                            "distill", dtype, div, f"bench@{V}",
                            lambda d=dtype, v=div, n=V: _distill_workload(d, v, "bench", n)))
        if "feature" in ops:
            for code, kind in enumerate(FEATURE_KINDS):
                # D = 4096 (the preset: the row lives in registers) and a row wider than a tile
                for var, D in (("onetile", D_BENCH), ("tiled", 4 * D_BENCH)):
                    out.append(Workload("feature", dtype, kind, var,
                                        lambda d=dtype, c=code, n=D: _feature_workload(d, c, n)))
        if "scale" in ops:
            out.append(Workload("scale", dtype, "-", "bench", lambda d=dtype: _scale_workload(d)))
    if "topk" in ops:  # the divergence label carries the tail: "forward_kl:bucket"
        for dtype, div, tail in TOPK_CASES:
            for var in variants:
                out.append(Workload("topk", dtype, f"{div}:{tail}", var,
                                    lambda d=dtype, v=div, t=tail, w=var:
                                    _topk_workload(d, v, t, w)))
    if "extract" in ops:
        for dtype in DTYPES:
            out.append(Workload("extract", dtype, "-", "bench",
                                lambda d=dtype: _extract_workload(d)))
    if "linear" in ops:  # 16-bit inputs: the tensor-core path of the gpu-linear preset
        for div in LINEAR_DIVERGENCES:
            for var in variants:
                out.append(Workload("linear", "bf16", div, var,
                                    lambda v=div, w=var: _linear_workload("bf16", v, w)))
            if "bench" in variants:  # mode="chunked" at the bench settings
                out.append(Workload("linear", "bf16", div, "chunked",
                                    lambda v=div: _linear_chunked_workload("bf16", v, "bench"),
                                    labels=CHUNKED_LABELS))
    return out


# ---- specialisation, the JIT's way ---------------------------------------------------------------


@dataclass
class Spec:
    """A kernel as it would be compiled at that launch."""
    name: str               # kernel[label(,CONST=value of the constexprs telling launches apart)]
    kernel: str
    op: str
    dtype: str
    divergence: str
    variant: str
    launch: Launch = field(repr=False)
    grid: Tuple[int, ...] = ()


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _jit_options_kwargs(kwargs):
    """The keys JITFunction.run adds to the launch keywords before binding."""
    kw = dict(kwargs)
    try:
        from triton import knobs
        kw.setdefault("debug", False)
        kw.setdefault("instrumentation_mode", knobs.compilation.instrumentation_mode)
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kw.setdefault("fpsan_homomorphic_casts", knobs.compilation.fpsan_homomorphic_casts)
    except (ImportError, AttributeError):
        kw.setdefault("debug", False)
    return kw


def specialise(launch: Launch, arch: int):
    """(target, signature, constexprs, attrs, options dict) for `launch` on sm_`arch`, exactly
    as JITFunction.run specialises it (Triton's own binder); with an older Triton that lacks
    it, the same rules by hand (:func:`specialise_by_hand`)."""
    target, backend = _backend(arch)
    try:
        from triton.runtime.jit import create_function_from_signature
        kwargs = _jit_options_kwargs(launch.kwargs)
        binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound,
                                                                     spec, opts)
        return target, signature, constexprs, attrs, options.__dict__
    except (ImportError, AttributeError, TypeError):
        sig, consts, attrs, opts = specialise_by_hand(launch)
        return target, sig, consts, attrs, opts


_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
                    "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
                    "float64": "fp64"}


def specialise_by_hand(launch: Launch):
    """Triton's JIT specialisation rules, for Triton versions without the binder API: tensors
    are pointers (divisible by 16 when their address is), integers i32 / i64 (the value 1
    becomes a constexpr, multiples of 16 get the divisibility hint), floats fp32, bools i1,
    None a constexpr."""
    import torch
    sig, consts, attrs = {}, {}, {}
    for i, (name, value) in enumerate(launch.bound().items()):
        p = launch.fn.params[i]
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[(i,)] = value
        elif value is None:
            sig[name] = "constexpr"
            consts[(i,)] = None
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                sig[name] = "constexpr"
                consts[(i,)] = 1
                continue
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"cannot specialise argument {name} of type {type(value).__name__}")
    return sig, consts, attrs, launch.options()


def _spec_key(launch: Launch) -> str:
    """Identity of a specialisation (arch-independent): kernel source hash, argument types,
    alignment, constexprs and launch options."""
    target, sig, consts, attrs, opts = specialise(launch, 90)
    blob = json.dumps([launch.fn.cache_key, sig, sorted((str(k), repr(v)) for k, v in
                                                        consts.items()),
                       sorted((str(k), repr(v)) for k, v in attrs.items()),
                       sorted((k, repr(v)) for k, v in launch.options().items())],
                      sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def constexprs(launch: Launch) -> Dict[str, Any]:
    """The launch's constexpr arguments (plain values)."""
    return {k: v for p, (k, v) in zip(launch.fn.params, launch.bound().items())
            if p.is_constexpr and isinstance(v, (bool, int, float, str))}


def collect(wls: Optional[List[Workload]] = None) -> List[Spec]:
    """Runs the workloads under :func:`capture`; one Spec per distinct specialisation."""
    specs, seen = [], set()
    for wl in (wls if wls is not None else workloads()):
        with capture() as launches:
            wl.run()
        if not launches:
            raise RuntimeError(f"workload {wl.op}[{wl.label}] launched no Triton kernel")
        by_kernel: Dict[str, List[Launch]] = {}
        for la in launches:
            by_kernel.setdefault(la.kernel, []).append(la)
        for kernel, las in by_kernel.items():
            # constexprs whose value differs between this kernel's launches name the launch
            consts = [constexprs(la) for la in las]
            varying = sorted(k for k in consts[0] if len({repr(c.get(k)) for c in consts}) > 1)
            for la, c in zip(las, consts):
                key = _spec_key(la)
                # a kernel already compiled for another workload is skipped, but for the
                # logit-level settings at other vocabulary sizes (bench@V): the model looks
                # the kernel of each V up by its label (compiled once: the cache is by key)
                if key in seen and not wl.variant.startswith("bench@"):
                    continue
                seen.add(key)
                tag = "".join(f",{k}={c[k]}" for k in varying)
                op, dtype = wl.labels.get(kernel, (wl.op, wl.dtype))
                specs.append(Spec(f"{kernel}[{wl.label}{tag}]", kernel, op, dtype,
                                  wl.divergence, wl.variant, la, la.grid_size()))
    return specs


# ---- compile and read ----------------------------------------------------------------------------


def _cache_dir() -> str:
    base = os.environ.get("FASTDISTILL_AOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastdistill", "aot")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:  # a read-only home: a private temporary cache
        base = tempfile.mkdtemp(prefix="fastdistill-aot-cache-")
    return base


def compile_spec(spec: Spec, arch: int, cache: Optional[str] = None) -> Dict[str, Any]:
    """Compiles `spec` for sm_`arch`; the record: name, labels, arch, reg/stack/shared/local,
    num_warps, the grid of the benchmark launch, the compact SASS."""
    import triton
    from triton.compiler import ASTSource
    target, sig, consts, attrs, opts = specialise(spec.launch, arch)
    key = hashlib.sha256(f"{_spec_key(spec.launch)}:{arch}:{triton.__version__}:"
                         f"{os.environ.get('TRITON_PTXAS_PATH', '')}".encode()).hexdigest()[:24]
    cache = cache or _cache_dir()
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{spec.kernel}-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    else:
        src = ASTSource(fn=spec.launch.fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=target, options=opts)
        cubin = k.asm["cubin"]
        usage = list(parse_resource_usage(_on_cubin(cubin, ["--dump-resource-usage"]))
                     .values())[0]
        sass = list(compact_sass(_on_cubin(cubin, ["--dump-sass"])).values())[0]
        rec = dict(reg=usage["reg"], stack=usage["stack"], shared=max(usage["shared"],
                                                                      k.metadata.shared),
                   local=usage["local"], num_warps=k.metadata.num_warps,
                   num_ctas=getattr(k.metadata, "num_ctas", 1),
                   num_stages=getattr(k.metadata, "num_stages", None), sass=sass)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    rec = dict(rec)
    rec.update(name=spec.name, kernel=spec.kernel, op=spec.op, dtype=spec.dtype,
               divergence=spec.divergence, variant=spec.variant, arch=arch, backend="triton",
               grid=list(spec.grid), constexprs=constexprs(spec.launch))
    return rec


def summary_flags(rec: Dict[str, Any]) -> Dict[str, bool]:
    """Whole-kernel facts from the SASS: 128-bit global loads (direct or cp.async), HMMA,
    HGMMA, TMA."""
    s = rec["sass"]
    return {"ldg128": bool(re.search(r"\bLDG(STS)?\.E\.[\w.]*128", s)),
            "hmma": "HMMA" in s, "hgmma": "HGMMA" in s, "tma": "UTMALDG" in s}


def compile_all(archs=(90,), name_filter: str = "", cache: Optional[str] = None,
                wls: Optional[List[Workload]] = None, log=None,
                shard: Tuple[int, int] = (0, 1),
                variants: Tuple[str, ...] = tuple(VARIANTS),
                vocabs: Tuple[int, ...] = ()) -> List[Dict[str, Any]]:
    """Records of every captured kernel (or those whose name contains `name_filter`; with
    shard (i, n), every n-th one from the i-th) for each arch."""
    records = []
    wls = wls if wls is not None else workloads(variants=variants, vocabs=vocabs)
    for arch in archs:
        # the launches as the launchers make them for this target (they may pick kernels by
        # the compute capability)
        with target_capability(arch):
            specs = [s for s in collect(wls) if not name_filter or name_filter in s.name]
        for spec in specs[shard[0]::shard[1]]:
            rec = compile_spec(spec, arch, cache)
            rec.update(summary_flags(rec))
            records.append(rec)
            if log:
                log(f"sm_{arch} {rec['name']:52s} reg={rec['reg']:3d} stack={rec['stack']} "
                    f"local={rec['local']} ldg128={rec['ldg128']} hmma={rec['hmma']} "
                    f"hgmma={rec['hgmma']}")
    return records


def compile_in_subprocess(archs=(80, 90), out_dir: Optional[str] = None,
                          cache: Optional[str] = None, name_filter: str = "",
                          timeout: float = 1800, jobs: Optional[int] = None,
                          variants: Optional[Dict[int, Tuple[str, ...]]] = None,
                          vocabs: Tuple[int, ...] = ()) -> List[Dict[str, Any]]:
    """compile_all in fresh processes without TRITON_INTERPRET (for callers whose process runs
    the interpreter, e.g. the tests), `jobs` of them in parallel (default: one per arch), the
    kernels dealt out between them; `variants` per arch (default: all of VARIANTS)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out_dir = out_dir or tempfile.mkdtemp(prefix="fastdistill-aot-")
    archs = list(archs)
    jobs = max(jobs or len(archs), len(archs))
    per_arch = max(1, jobs // len(archs))
    procs = []
    for arch in archs:
        for i in range(per_arch):
            path = os.path.join(out_dir, f"sm{arch}-{i}.json")
            cmd = [sys.executable, "-m", "fastdistill.bench.aot", "--arch", str(arch), "--json",
                   path, "--shard", f"{i}/{per_arch}"]
            if cache:
                cmd += ["--cache", cache]
            if name_filter:
                cmd += ["--filter", name_filter]
            if variants and arch in variants:
                cmd += ["--variants", *variants[arch]]
            if vocabs:
                cmd += ["--vocabs", *(str(v) for v in vocabs)]
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), path, arch))
    records = []
    for p, path, arch in procs:
        log = p.communicate(timeout=timeout)[0]
        if p.returncode != 0:
            raise RuntimeError(f"AOT compile for sm_{arch} failed (exit {p.returncode}):\n"
                               f"{log[-4000:]}")
        with open(path) as f:
            records += json.load(f)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdistill.bench.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write the records (with SASS) here")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--cache", default=None, help="cache directory (default ~/.cache/...)")
    ap.add_argument("--shard", default="0/1", help="i/n: every n-th kernel from the i-th")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="loss settings of the logit-level and linear kernels")
    ap.add_argument("--vocabs", nargs="*", type=int, default=[],
                    help="the logit-level bench settings at these vocabulary sizes too")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    i, n = (int(x) for x in args.shard.split("/"))
    records = compile_all(args.arch, args.filter, args.cache, shard=(i, n),
                          variants=tuple(args.variants), vocabs=tuple(args.vocabs),
                          log=lambda m: print(m, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
