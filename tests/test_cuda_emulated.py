"""The CUDA kernels' own source, run on the CPU through a host emulation of the CUDA built-ins
(tests/cuda_emu/): one std::thread per CUDA thread, real barriers and warp shuffles. Checked
against the float64 references: indexing, partial units, the misaligned-row path, reductions,
padding, aliasing of the gradient with the student. (The GPU runs of the same kernels are in
test_gpu_backends.py.)"""

import ctypes
import math
import os
import sys

import pytest
import torch

import fastdistill as fd
from fastdistill.backends import _ext
from fastdistill.divergences import make_options, reference_distill_loss
from fastdistill.feature import reference_feature_loss
from util import assert_close, logits

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
import build as emu_build  # noqa: E402

if emu_build.compiler() is None:
    pytest.skip("no C++ compiler for the CUDA emulation", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = {"mse": 0, "cosine": 1, "normalized_mse": 2}


@pytest.fixture(scope="module")
def lib():
    return emu_build.load()


def _p(x):
    return ctypes.c_void_p(x.data_ptr() if x is not None else 0)


def distill(lib, s, t, labels=None, *, vocab=None, grad=True, grad_out=None, scale=1.0, **kw):
    """(loss rows, gradient) from the emulated cuda::distill_rows; same arguments as a backend's
    distill_forward on 2-D CPU tensors."""
    opts = make_options(**kw)
    N, W = s.shape
    V = vocab if vocab is not None else W
    rows = torch.full((N,), -1.0)
    g = None
    if grad:
        g = grad_out if grad_out is not None else torch.full_like(s, 7.0)  # no zeros by luck
    lab = labels.contiguous() if labels is not None else None
    gs = torch.tensor([scale], dtype=torch.float32)
    status = lib.emu_distill(
        _p(s), _ext.DTYPE_CODES[s.dtype], s.stride(0), _p(t), _ext.DTYPE_CODES[t.dtype],
        t.stride(0), _p(lab), _p(g), g.stride(0) if g is not None else 0, W, _p(rows), N,
        opts.kernel_code, opts.beta, 1.0 / opts.temperature, opts.soft_scale, opts.hard_weight,
        opts.ignore_index, V, _p(gs))
    assert status == 0, (status, lib.emu_last_error())
    return rows, g


def reference(s, t, labels=None, *, vocab=None, scale=1.0, **kw):
    """float64 loss rows and scale * d rows / d s (zero in padding columns)."""
    s64 = s.double().requires_grad_()
    rows = reference_distill_loss(s64, t.double(), labels, reduction="none", vocab_size=vocab,
                                  **kw)
    rows.sum().backward()
    return rows.detach(), s64.grad * scale


def tol(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=2e-6)
    return dict(rtol=2 ** -8 if dtype == torch.bfloat16 else 2 ** -11, atol=1e-5)


def check(lib, s, t, labels=None, **kw):
    rows, g = distill(lib, s, t, labels, **kw)
    kw.pop("grad", None)
    ref_rows, ref_g = reference(s, t, labels, **kw)
    assert_close(rows, ref_rows, rtol=2e-5, atol=2e-5, what=f"emulated loss {kw}")
    assert_close(g, ref_g, **tol(s.dtype), what=f"emulated grad {kw}")
    return rows, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
def test_divergences(lib, dtype, divergence):
    # 3001 columns: two passes of 256 threads over 8-column units, a partial last unit
    s, t = logits((3, 3001), dtype), logits((3, 3001), dtype)
    check(lib, s, t, divergence=divergence, beta=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
def test_temperature_hard_ignore(lib, dtype, divergence):
    N, V = 5, 2053
    s, t = logits((N, V), dtype), logits((N, V), dtype)
    labels = torch.tensor([7, -100, 2047, V - 1, 0])
    rows, g = check(lib, s, t, labels, divergence=divergence, beta=0.6, temperature=0.7,
                    t2_scale=True, hard_weight=0.4, soft_weight=0.8, scale=0.5)
    assert rows[1] == 0 and torch.all(g[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_rows_match_aligned_bitwise(lib, dtype):
    N, V = 4, 1531
    big_s, big_t = logits((N, V + 9), dtype), logits((2 * N, V + 3), dtype)
    s, t = big_s[:, 1:V + 1], big_t[::2, 3:]
    labels = torch.randint(0, V, (N,))
    kw = dict(divergence="jsd", hard_weight=0.3, temperature=1.4)
    r1, g1 = distill(lib, s, t, labels, **kw)
    r2, g2 = distill(lib, s.contiguous(), t.contiguous(), labels, **kw)
    assert torch.equal(r1, r2) and torch.equal(g1, g2)
    check(lib, s, t, labels, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "skew_forward_kl"])
def test_gradient_over_student(lib, dtype, divergence):
    s, t = logits((3, 2500), dtype), logits((3, 2500), dtype)
    labels = torch.tensor([5, 2499, 1000])
    kw = dict(divergence=divergence, hard_weight=0.5, temperature=1.3, beta=0.4)
    r1, g1 = distill(lib, s, t, labels, **kw)
    buf = s.clone()
    r2, _ = distill(lib, buf, t, labels, grad_out=buf, **kw)
    assert torch.equal(r1, r2) and torch.equal(g1, buf)


def test_padding_is_zeroed_and_never_read(lib):
    N, V = 3, 1000
    s, t = logits((N, V + 24)), logits((N, V + 5))
    s[:, V:] = math.nan
    t[:, V:] = math.nan
    labels = torch.tensor([0, 999, 500])
    rows, g = distill(lib, s, t, labels, vocab=V, divergence="tvd", hard_weight=0.2)
    assert torch.isfinite(rows).all() and torch.all(g[:, V:] == 0)
    ref_rows, ref_g = reference(s, t, labels, vocab=V, divergence="tvd", hard_weight=0.2)
    assert_close(rows, ref_rows, rtol=2e-5, atol=2e-5, what="padded loss")
    assert_close(g[:, :V], ref_g[:, :V], rtol=1e-4, atol=2e-6, what="padded grad")


@pytest.mark.parametrize("divergence", fd.DIVERGENCES)
def test_neg_inf_columns(lib, divergence):
    N, V = 3, 777
    s, t = logits((N, V)), logits((N, V))
    cols = torch.randperm(V - 1)[: V // 3] + 1
    cols = cols[cols != 5]
    s[:, cols] = -math.inf
    t[:, cols] = -math.inf
    s[0, :] = -math.inf
    t[0, :] = -math.inf
    s[0, 5], t[0, 5] = 2.0, -1.0
    labels = torch.tensor([5, 0, 0])
    rows, g = check(lib, s, t, labels, divergence=divergence, beta=0.4, hard_weight=0.5,
                    temperature=1.5)
    assert torch.isfinite(rows).all() and torch.all(g[:, cols] == 0)


def test_bad_labels_nan_rows_and_loss_only(lib):
    s, t = logits((3, 300)), logits((3, 300))
    labels = torch.tensor([2, 300, -7])
    rows, g = distill(lib, s, t, labels, hard_weight=1.0)
    assert torch.isfinite(rows[0]) and torch.isnan(rows[1:]).all()
    assert torch.all(g[1:] == 0)
    rows2, g2 = distill(lib, s, t, labels, hard_weight=1.0, grad=False)  # no pass 3
    assert g2 is None and torch.equal(rows[:1], rows2[:1]) and torch.isnan(rows2[1:]).all()


def test_wide_and_odd_rows(lib):
    for V in (50257, 128256):
        s, t = logits((2, V), torch.bfloat16), logits((2, V), torch.bfloat16)
        labels = torch.randint(0, V, (2,))
        check(lib, s, t, labels, divergence="forward_kl", hard_weight=0.1, temperature=2.0)


def test_deterministic_under_real_threads(lib):
    s, t = logits((3, 5000)), logits((3, 5000))
    a = distill(lib, s, t, divergence="jsd", beta=0.5)
    b = distill(lib, s, t, divergence="jsd", beta=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- feature losses ---------------------------------------------------------------------------

def feature(lib, s, t, kind, mask=None, scale=1.0):
    N, D = s.shape
    rows = torch.full((N,), -1.0)
    g = torch.full_like(s, 7.0)
    gs = torch.tensor([scale], dtype=torch.float32)
    status = lib.emu_feature(_p(s), _ext.DTYPE_CODES[s.dtype], s.stride(0), _p(t),
                             _ext.DTYPE_CODES[t.dtype], t.stride(0), _p(mask), _p(g), g.stride(0),
                             _p(rows), N, D, KINDS[kind], _p(gs))
    assert status == 0, (status, lib.emu_last_error())
    return rows, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
# 40: one warp; 1000: a partial unit; 4096; 8192: the widest row kept in registers; 8200 and
# 20000: streamed rows
@pytest.mark.parametrize("D", [40, 1000, 4096, 8192, 8200, 20000])
def test_feature(lib, dtype, kind, D):
    N = 4
    s, t = logits((N, D), dtype, 1.0) + 0.5, logits((N, D), dtype, 1.0)
    t[1] = s[1]
    mask = torch.tensor([True, True, False, True])
    rows, g = feature(lib, s, t, kind, mask, scale=0.5)
    s64 = s.double().requires_grad_()
    ref = reference_feature_loss(s64, t, kind=kind, mask=mask, reduction="none")
    ref.sum().backward()
    assert_close(rows, ref, rtol=1e-5, atol=1e-5, what=f"emulated {kind} loss")
    assert_close(g, s64.grad * 0.5, **tol(dtype), what=f"emulated {kind} grad")
    assert rows[2] == 0 and torch.all(g[2] == 0)


def test_feature_misaligned_mixed(lib):
    big = logits((3, 3000), torch.bfloat16, 1.0)
    s, t = big[:, 3:2003], logits((3, 2000), torch.float32, 1.0)
    for kind in KINDS:
        rows, g = feature(lib, s, t, kind)
        rows2, g2 = feature(lib, s.contiguous(), t, kind)
        assert torch.equal(rows, rows2) and torch.equal(g, g2)
        s64 = s.double().requires_grad_()
        ref = reference_feature_loss(s64, t, kind=kind, reduction="none")
        ref.sum().backward()
        assert_close(rows, ref, rtol=1e-5, atol=1e-5, what=f"{kind} loss")
        assert_close(g, s64.grad, rtol=2 ** -8, atol=1e-6, what=f"{kind} grad")


# ---- in-place scaling -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_rows(lib, dtype):
    g = logits((5, 1003), dtype)
    for factor, per_row in ((torch.tensor([1.0, 2.0, -0.5, 1.0, 3.0]), True),
                            (torch.tensor([0.25]), False), (torch.tensor([1.0]), False)):
        got = g.clone()
        assert lib.emu_scale(_p(got), _ext.DTYPE_CODES[dtype], got.stride(0), 5, 1003,
                             _p(factor), per_row) == 0
        f = factor[:, None] if per_row else factor
        assert torch.equal(got, (g.float() * f).to(dtype))
    # a misaligned view: the scalar path, the same values
    big = logits((5, 1010), dtype)
    view = big[:, 3:1006]
    want = (view.float() * 2.0).to(dtype)
    assert lib.emu_scale(_p(view), _ext.DTYPE_CODES[dtype], view.stride(0), 5, 1003,
                         _p(torch.tensor([2.0])), False) == 0
    assert torch.equal(view, want)


def test_launch_errors_are_reported(lib):
    s = logits((2, 10))
    rows = torch.empty(2)
    gs = torch.ones(1)
    # grad narrower than the vocabulary: a bad argument (status 1), nothing launched
    assert lib.emu_distill(_p(s), 0, 10, _p(s), 0, 10, None, _p(s), 10, 5, _p(rows), 2, 0, 0.5,
                           1.0, 1.0, 0.0, -100, 10, _p(gs)) == 1
    assert lib.emu_feature(_p(s), 0, 10, _p(s), 0, 10, None, None, 0, _p(rows), 2, 10, 7,
                           _p(gs)) == 1
    assert lib.emu_distill(_p(s), 5, 10, _p(s), 0, 10, None, None, 0, 10, _p(rows), 2, 0, 0.5,
                           1.0, 1.0, 0.0, -100, 10, _p(gs)) == 2
