"""Feature (hidden-state) losses: loss per row and the student gradient, in one launch.

One program per row. Kinds (csrc/include/fastdistill/feature.h has the same math):
  0 mse             L = mean_j (s_j - t_j)^2                   dL/ds = 2/D (s - t)
  1 cosine          L = 1 - s.t / (max(|s|, 1e-8) max(|t|, 1e-8))
  2 normalized_mse  mse of the layer-normalised rows (no affine, eps 1e-5)
and in every case dL/ds_j = cs (s_j - ms) + ct (t_j - mt).

Rows of up to ONE_TILE_MAX features are loaded once and kept in registers: HBM traffic per row
is D * (E_s + E_t + E_s) bytes (read s and t, write the gradient), the floor. Wider rows loop
over tiles (the later passes re-read the row from L2). Masked rows write zeros and read nothing.
"""

import torch
import triton
import triton.language as tl

from fastdistill.config import FEATURE_KINDS
from fastdistill.kernels import interpreting

# feature kinds: their positions in fastdistill.config.FEATURE_KINDS
MSE, COSINE, NORM = (tl.constexpr(FEATURE_KINDS.index(k))
                     for k in ("mse", "cosine", "normalized_mse"))
COS_EPS = tl.constexpr(1e-8)
LN_EPS = tl.constexpr(1e-5)
ONE_TILE_MAX = 8192


@triton.jit
def _coef(ss, tt, st, D, KIND: tl.constexpr):
    """(cs, ct, inv_sig_s, inv_sig_t) from the (centred, for NORM) row sums."""
    if KIND == MSE:
        cs = 2.0 / D
        ct = -2.0 / D
        a = 1.0
        b = 1.0
    elif KIND == COSINE:
        ns = tl.sqrt_rn(ss)
        nt = tl.sqrt_rn(tt)
        ns_c = tl.maximum(ns, COS_EPS)
        nt_c = tl.maximum(nt, COS_EPS)
        cosv = st / (ns_c * nt_c)
        cs = tl.where(ns > COS_EPS, cosv / (ns_c * ns_c), 0.0)
        ct = -1.0 / (ns_c * nt_c)
        a = cosv  # returned through the same slots: the cosine
        b = 1.0
    else:
        vs = ss / D + LN_EPS
        vt = tt / D + LN_EPS
        a = 1.0 / tl.sqrt_rn(vs)
        b = 1.0 / tl.sqrt_rn(vt)
        shat2 = ss / (D * vs)
        sthat = st * a * b / D
        md = 2.0 / D * (shat2 - sthat)
        cs = (2.0 / D - md) / vs
        ct = -2.0 / D * a * b
    # a NaN (or an overflow) in the row sums makes every gradient element NaN (RELIABILITY.md)
    poison = (ss + tt + st) * 0.0
    return cs + poison, ct + poison, a, b


@triton.jit
def feature_kernel(s_ptr, s_stride, t_ptr, t_stride, mask_ptr, g_ptr, g_stride, loss_ptr,
                   scale_ptr, D,
                   KIND: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr,
                   BLOCK: tl.constexpr, ONE_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)
    valid = True
    if HAS_MASK:
        valid = tl.load(mask_ptr + row) != 0
    if valid:
        scale = 1.0
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
        if ONE_TILE:
            inb = offs < D
            s = tl.load(s_row + offs, mask=inb, other=0.0).to(tl.float32)
            t = tl.load(t_row + offs, mask=inb, other=0.0).to(tl.float32)
            ms = 0.0
            mt = 0.0
            if KIND == NORM:
                ms = tl.sum(s, axis=0) / D
                mt = tl.sum(t, axis=0) / D
            sc = tl.where(inb, s - ms, 0.0)
            tc = tl.where(inb, t - mt, 0.0)
            if KIND == MSE:
                d = sc - tc
                d2 = tl.sum(d * d, axis=0)
                loss = d2 / D
                cs, ct, a, b = _coef(d2, 0.0, 0.0, D, KIND)
            else:
                cs, ct, a, b = _coef(tl.sum(sc * sc, axis=0), tl.sum(tc * tc, axis=0),
                                     tl.sum(sc * tc, axis=0), D, KIND)
                if KIND == COSINE:
                    loss = 1.0 - a
                else:
                    d = sc * a - tc * b
                    loss = tl.sum(d * d, axis=0) / D
            tl.store(loss_ptr + row, loss)
            if WRITE_GRAD:
                g = scale * (cs * sc + ct * tc)
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=inb)
        else:
            ms = 0.0
            mt = 0.0
            if KIND == NORM:
                acc_s = tl.zeros([BLOCK], dtype=tl.float32)
                acc_t = tl.zeros([BLOCK], dtype=tl.float32)
                for j0 in range(0, D, BLOCK):
                    cols = j0 + offs
                    acc_s += tl.load(s_row + cols, mask=cols < D, other=0.0).to(tl.float32)
                    acc_t += tl.load(t_row + cols, mask=cols < D, other=0.0).to(tl.float32)
                ms = tl.sum(acc_s, axis=0) / D
                mt = tl.sum(acc_t, axis=0) / D
            a_ss = tl.zeros([BLOCK], dtype=tl.float32)
            a_tt = tl.zeros([BLOCK], dtype=tl.float32)
            a_st = tl.zeros([BLOCK], dtype=tl.float32)
            for j0 in range(0, D, BLOCK):
                cols = j0 + offs
                inb = cols < D
                sc = tl.where(inb, tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32) - ms, 0.0)
                tc = tl.where(inb, tl.load(t_row + cols, mask=inb, other=0.0).to(tl.float32) - mt, 0.0)
                if KIND == MSE:
                    a_ss += (sc - tc) * (sc - tc)
                else:
                    a_ss += sc * sc
                    a_tt += tc * tc
                    a_st += sc * tc
            cs, ct, a, b = _coef(tl.sum(a_ss, axis=0), tl.sum(a_tt, axis=0),
                                 tl.sum(a_st, axis=0), D, KIND)
            a_d2 = tl.zeros([BLOCK], dtype=tl.float32)
            if WRITE_GRAD or KIND == NORM:
                for j0 in range(0, D, BLOCK):
                    cols = j0 + offs
                    inb = cols < D
                    sc = tl.where(inb, tl.load(s_row + cols, mask=inb, other=0.0).to(tl.float32) - ms, 0.0)
                    tc = tl.where(inb, tl.load(t_row + cols, mask=inb, other=0.0).to(tl.float32) - mt, 0.0)
                    if KIND == NORM:
                        d = sc * a - tc * b
                        a_d2 += d * d
                    if WRITE_GRAD:
                        g = scale * (cs * sc + ct * tc)
                        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=inb)
            if KIND == MSE:
                loss = tl.sum(a_ss, axis=0) / D
            elif KIND == COSINE:
                loss = 1.0 - a
            else:
                loss = tl.sum(a_d2, axis=0) / D
            tl.store(loss_ptr + row, loss)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            zero_g = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
            for j0 in range(0, D, BLOCK):
                cols = j0 + offs
                tl.store(g_row + cols, zero_g, mask=cols < D)


def feature_forward(student, teacher, mask, kind, grad_scale, need_grad):
    """Launcher with the backend contract of fastdistill.backends.torch_backend.feature_forward."""
    N, D = student.shape
    rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = student.new_empty(student.shape) if need_grad else None
    if N == 0:
        return rows, grad
    one_max = 64 if interpreting() else ONE_TILE_MAX
    block = triton.next_power_of_2(D)
    one_tile = block <= one_max
    if not one_tile:
        block = min(block, 32 if interpreting() else 4096)
    feature_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0),
        mask if mask is not None else rows,
        grad if grad is not None else rows, grad.stride(0) if grad is not None else 0,
        rows, grad_scale, D,
        KIND=kind, HAS_MASK=mask is not None, WRITE_GRAD=grad is not None, BLOCK=block,
        ONE_TILE=one_tile, num_warps=8 if block >= 2048 else 4,
    )
    return rows, grad
