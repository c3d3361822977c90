"""Error bounds of the exp2 / log2 of csrc/include/fastdistill/fast_math.h against float64: the
host polynomials on every run (through the emulation library, which compiles the same header),
the device's ex2.approx.ftz.f32 / lg2.approx.ftz.f32 (MUFU) on a GPU; and the launcher plan of the
CUDA resident kernel as the static model (fastdistill.bench.roofline) mirrors it."""

import ctypes

import numpy as np
import pytest
import torch

emu = pytest.importorskip("emu_backend")
from util import _emu_available  # noqa: E402

needs_emu = pytest.mark.skipif(not _emu_available(), reason="needs a C++ compiler")


def _floats(lo, hi, step=97):
    """Every `step`-th float32 bit pattern of [lo, hi] (about 2^32 / step values overall)."""
    bits = np.arange(0, 2 ** 32, step, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    return x[np.isfinite(x) & (x >= lo) & (x <= hi)].copy()


def _host(fn, x):
    y = np.empty_like(x)
    fn(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), x.size)
    return y


def _ulp(ref):
    return np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)


@needs_emu
def test_host_exp2_within_one_ulp():
    x = _floats(-126.0, 127.0)
    y = _host(emu.lib().emu_exp2, x).astype(np.float64)
    ref = np.exp2(x.astype(np.float64))
    err = np.abs(y - ref) / _ulp(ref)
    assert err.max() < 1.0, err.max()
    assert np.abs(y / ref - 1).max() < 2 ** -23.5


@needs_emu
def test_host_log2_within_two_ulp():
    x = _floats(np.float32(2 ** -126), np.float32(3e38))
    y = _host(emu.lib().emu_log2, x).astype(np.float64)
    ref = np.log2(x.astype(np.float64))
    err = np.abs(y - ref) / _ulp(ref)
    assert err.max() < 2.0, err.max()


@needs_emu
def test_host_special_values():
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    x = np.array([-inf, inf, nan, -126.5, -127.0, -1000.0, 0.0], dtype=np.float32)
    y = _host(emu.lib().emu_exp2, x)
    assert y[0] == 0 and y[1] == inf and np.isnan(y[2]) and y[3] == 0 and y[4] == 0
    assert y[5] == 0 and y[6] == 1
    x = np.array([0.0, 1e-40, -1.0, inf, nan, 1.0, 0.5], dtype=np.float32)
    y = _host(emu.lib().emu_log2, x)
    assert y[0] == -inf and y[1] == -inf and np.isnan(y[2]) and y[3] == inf and np.isnan(y[4])
    assert y[5] == 0 and y[6] == -1


@pytest.mark.gpu
def test_device_mufu_bounds():
    """ex2.approx.ftz.f32 within 2 ulp and lg2.approx.ftz.f32 within 2^-22 absolute on [0.5, 2]
    and 2 ulp elsewhere (CUDA C++ Programming Guide, intrinsic functions; measured here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def k(x_ptr, e_ptr, l_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
        lg = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                       dtype=tl.float32, is_pure=True, pack=1)
        tl.store(e_ptr + offs, e, mask=offs < n)
        tl.store(l_ptr + offs, lg, mask=offs < n)

    x = np.concatenate([_floats(-126.0, 127.0, 997), _floats(np.float32(2 ** -126), 3e38, 997)])
    xd = torch.from_numpy(x).cuda()
    e, lg = torch.empty_like(xd), torch.empty_like(xd)
    k[(triton.cdiv(x.size, 1024),)](xd, e, lg, x.size, BLOCK=1024)
    e, lg = e.cpu().double().numpy(), lg.cpu().double().numpy()
    sel = x <= 127.0
    ref = np.exp2(x[sel].astype(np.float64))
    ok = ref >= 2 ** -126
    assert (np.abs(e[sel][ok] - ref[ok]) / _ulp(ref[ok])).max() <= 2.0
    pos = x > 0
    ref = np.log2(x[pos].astype(np.float64))
    near = (x[pos] >= 0.5) & (x[pos] <= 2.0)
    assert np.abs(lg[pos][near] - ref[near]).max() <= 2 ** -22
    assert (np.abs(lg[pos][~near] - ref[~near]) / _ulp(ref[~near])).max() <= 2.0


@needs_emu
@pytest.mark.parametrize("dtype,bytes_", [(torch.bfloat16, 2), (torch.float32, 4)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd", "skew_reverse_kl"])
def test_model_mirrors_the_launcher_plan(dtype, bytes_, divergence):
    """fastdistill.bench.roofline.resident_plan (the static model) and the CUDA launcher
    (csrc/cuda/distill_cuda.cu: plan_resident, run through the emulation on an sm_90 with 227 KB
    of shared memory per block) pick the same cluster, slice and h storage at the presets'
    vocabularies."""
    from fastdistill.bench import roofline as R
    from fastdistill.config import DistillConfig
    emu.set_device(9, 227 << 10)
    try:
        for V in R.LOGIT_VOCABS:
            s = torch.empty(2, V, dtype=dtype)
            got = emu.plan(s, s, None, DistillConfig(divergence=divergence).kernel_options(), V)
            p = R.resident_plan(R.H200, {2: "bf16", 4: "fp32"}[bytes_], divergence, V)
            want = (p.cluster, p.slice_units, int(p.store_h)) if p else (0, 0, 0)
            assert got == want, (V, got, want)
    finally:
        emu.set_device(*emu.DEFAULT_DEVICE)
