"""Logit-level distillation: loss per row and the student gradient, in one launch.

One program per row streams the row over vocabulary tiles of BLOCK columns with float32 running
statistics (online log-sum-exp), and writes the gradient, already multiplied by the reduction
scale, in the forward pass. The math mirrors csrc/include/fastdistill/divergence.h (see there
for the formulas); both are tested against the float64 reference of fastdistill.divergences.

Passes over a row and HBM traffic per row (E = bytes per element of the inputs, V columns):

  divergence                 passes                          bytes
  forward_kl, reverse_kl     1: online LSEs + divergence     2 reads of s and t + 1 write of g
                             3: gradient                     = V * (2 * (E_s + E_t) + E_s)
  jsd, skew_*, tvd           1: LSEs  2: loss, aux           3 reads + 1 write
                             3: gradient                     = V * (3 * (E_s + E_t) + E_s)
  ignored row                zero-fill                       V * E_s
  no gradient wanted         pass 3 skipped                  one read pass fewer, no write

Extra memory: the [N] float32 row losses. No atomics; the reduction over rows is a separate
deterministic torch.sum. Row offsets are int64 (N * V can pass 2^31).
"""

import torch
import triton
import triton.language as tl

from fastdistill.kernels import interpreting

# Divergence codes of fastdistill.divergences.DIVERGENCE_CODES.
FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
SFKL = tl.constexpr(3)
SRKL = tl.constexpr(4)
TVD = tl.constexpr(5)


@triton.jit
def _pass2_terms(lq, lp, beta, DIV: tl.constexpr):
    """(loss terms, q * h terms) of the pass-2 divergences, elementwise."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == JSD:
        lm = tl.log(beta * p + (1.0 - beta) * q)
        loss = tl.where(p > 0, beta * p * (lp - lm), 0.0) + \
            tl.where(q > 0, (1.0 - beta) * q * (lq - lm), 0.0)
        qh = tl.where(q > 0, q * (1.0 - beta) * (lq - lm), 0.0)
    elif DIV == SFKL:
        m = beta * p + (1.0 - beta) * q
        lm = tl.log(m)
        loss = tl.where(p > 0, p * (lp - lm), 0.0)
        qh = tl.where(m > 0, -(1.0 - beta) * q * p / m, 0.0)
    elif DIV == SRKL:
        m = (1.0 - beta) * p + beta * q
        lm = tl.log(m)
        loss = tl.where(q > 0, q * (lq - lm), 0.0)
        qh = tl.where(q > 0, q * (lq - lm - beta * q / m), 0.0)
    else:  # TVD
        d = q - p
        loss = 0.5 * tl.abs(d)
        qh = q * tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))
    return loss, qh


@triton.jit
def _soft_grad(lq, lp, beta, aux, DIV: tl.constexpr):
    """dD/da elementwise (a = z_s / T)."""
    q = tl.exp(lq)
    if DIV == FKL:
        g = q - tl.exp(lp)
    elif DIV == RKL:
        g = tl.where(q > 0, q * (lq - lp - aux), 0.0)
    elif DIV == JSD:
        p = tl.exp(lp)
        lm = tl.log(beta * p + (1.0 - beta) * q)
        g = tl.where(q > 0, q * ((1.0 - beta) * (lq - lm) - aux), 0.0)
    elif DIV == SFKL:
        p = tl.exp(lp)
        m = beta * p + (1.0 - beta) * q
        h = tl.where(m > 0, -(1.0 - beta) * p / m, 0.0)
        g = q * (h - aux)
    elif DIV == SRKL:
        p = tl.exp(lp)
        m = (1.0 - beta) * p + beta * q
        g = tl.where(q > 0, q * (lq - tl.log(m) - beta * q / m - aux), 0.0)
    else:  # TVD
        d = q - tl.exp(lp)
        g = q * (tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0)) - aux)
    return g


@triton.jit
def _rescale(m_old, m_new):
    """exp(m_old - m_new), 0 when the side has seen nothing (m_old = -inf)."""
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - m_new))


@triton.jit
def _shifted_w(w, d_t, d_s, m_s, m_t, ms, mt, DIV: tl.constexpr):
    """w re-expressed relative to the new maxima (ms, mt), before its rescale factor."""
    if DIV == FKL:
        r = tl.where(m_t == float("-inf"), 0.0, w - ((mt - m_t) - (ms - m_s)) * d_t)
    else:
        r = tl.where(m_s == float("-inf"), 0.0, w - ((ms - m_s) - (mt - m_t)) * d_s)
    return r


@triton.jit
def _merge(m_s, m_t, d_s, d_t, w, cm_s, cm_t, cd_s, cd_t, cw, DIV: tl.constexpr):
    """Union of two pass-1 states (see Online / online_merge in divergence.h)."""
    ms = tl.maximum(m_s, cm_s)
    mt = tl.maximum(m_t, cm_t)
    xs = _rescale(m_s, ms)
    ys = _rescale(cm_s, ms)
    xt = _rescale(m_t, mt)
    yt = _rescale(cm_t, mt)
    if DIV == FKL:
        w = xt * _shifted_w(w, d_t, d_s, m_s, m_t, ms, mt, DIV) + \
            yt * _shifted_w(cw, cd_t, cd_s, cm_s, cm_t, ms, mt, DIV)
    elif DIV == RKL:
        w = xs * _shifted_w(w, d_t, d_s, m_s, m_t, ms, mt, DIV) + \
            ys * _shifted_w(cw, cd_t, cd_s, cm_s, cm_t, ms, mt, DIV)
    return ms, mt, xs * d_s + ys * cd_s, xt * d_t + yt * cd_t, w


@triton.jit
def _empty_state(zero):
    """Pass-1 state before anything is seen, shaped like `zero` (a scalar or one per row):
    (m_s, m_t, d_s, d_t, w, m_1, d_1); m = -inf with d = 0 means "nothing finite yet"."""
    neg = zero + float("-inf")
    return neg, neg, zero, zero, zero, neg, zero


@triton.jit
def _tile_stats(a, b, DIV: tl.constexpr, AXIS: tl.constexpr):
    """Pass-1 state of one tile of scaled logits a (student) and b (teacher), reduced along
    AXIS (the vocabulary): maxima, shifted sums and the KL numerator relative to the tile's
    maxima (w_term of divergence.h). Shared by the logit-level and the fused linear kernels."""
    NEG_INF: tl.constexpr = float("-inf")
    cm_s = tl.max(a, axis=AXIS)
    cm_t = tl.max(b, axis=AXIS)
    xs = a - tl.expand_dims(cm_s, AXIS)
    xt = b - tl.expand_dims(cm_t, AXIS)
    e_s = tl.where(a == NEG_INF, 0.0, tl.exp(xs))
    e_t = tl.where(b == NEG_INF, 0.0, tl.exp(xt))
    cw = tl.zeros_like(cm_s)  # unused by the other divergences
    if DIV == FKL:
        wt = tl.where(a == NEG_INF, float("inf"), e_t * (xt - xs))
        cw = tl.sum(tl.where(b == NEG_INF, 0.0, wt), axis=AXIS)
    elif DIV == RKL:
        wt = tl.where(b == NEG_INF, float("inf"), e_s * (xs - xt))
        cw = tl.sum(tl.where(a == NEG_INF, 0.0, wt), axis=AXIS)
    return cm_s, cm_t, tl.sum(e_s, axis=AXIS), tl.sum(e_t, axis=AXIS), cw


@triton.jit
def _lse_merge(m, d, x, AXIS: tl.constexpr):
    """Plain online log-sum-exp update with one tile x, reduced along AXIS."""
    cm = tl.max(x, axis=AXIS)
    cd = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - tl.expand_dims(cm, AXIS))),
                axis=AXIS)
    m_new = tl.maximum(m, cm)
    return m_new, _rescale(m, m_new) * d + _rescale(cm, m_new) * cd


@triton.jit
def distill_kernel(
    s_ptr, s_stride, t_ptr, t_stride, labels_ptr, g_ptr, g_stride, loss_ptr, scale_ptr,
    V, G_WIDTH, ignore_index, beta, inv_t, soft_scale, hard_weight,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, T_IS_1: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")

    label = 0
    valid = True   # the row counts
    usable = True  # ... and its label, if the hard loss needs one, is in [0, V)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        usable = valid
        if HARD:
            usable = valid & (label >= 0) & (label < V)

    if usable:
        # ---- pass 1: online statistics of a = z_s / T and b = z_t / T (and of z_s for CE) ----
        # Each tile's statistics relative to its own maxima, merged into the row's; w is the
        # one-pass KL numerator relative to the running maxima (see divergence.h).
        m_s, m_t, d_s, d_t, w, m_1, d_1 = _empty_state(tl.zeros([], dtype=tl.float32))
        for j0 in range(0, V, BLOCK):
            cols = j0 + offs
            inb = cols < V
            zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
            zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
            cm_s, cm_t, cd_s, cd_t, cw = _tile_stats(zs * inv_t, zt * inv_t, DIV, 0)
            m_s, m_t, d_s, d_t, w = _merge(m_s, m_t, d_s, d_t, w, cm_s, cm_t, cd_s, cd_t, cw, DIV)
            if HARD and not T_IS_1:
                m_1, d_1 = _lse_merge(m_1, d_1, zs, 0)
        ld_s = tl.log(d_s)
        ld_t = tl.log(d_t)
        if HARD and not T_IS_1:
            ld_1 = tl.log(d_1)
        else:
            m_1 = m_s
            ld_1 = ld_s

        aux = 0.0
        if DIV == FKL:
            div = w / d_t - ld_t + ld_s
        elif DIV == RKL:
            div = w / d_s - ld_s + ld_t
            aux = div
        else:
            # ---- pass 2: loss and aux = sum q h ----
            acc_l = tl.zeros([BLOCK], dtype=tl.float32)
            acc_a = tl.zeros([BLOCK], dtype=tl.float32)
            for j0 in range(0, V, BLOCK):
                cols = j0 + offs
                inb = cols < V
                zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                lt, qh = _pass2_terms((zs * inv_t - m_s) - ld_s, (zt * inv_t - m_t) - ld_t, beta,
                                       DIV)
                acc_l += tl.where(inb, lt, 0.0)
                acc_a += tl.where(inb, qh, 0.0)
            div = tl.sum(acc_l, axis=0)
            aux = tl.sum(acc_a, axis=0)

        loss = soft_scale * div
        if HARD:
            z_label = tl.load(s_row + label).to(tl.float32)
            # LSE - z[label] = (m - z[label]) + log d: no cancellation of large logits
            loss += hard_weight * ((m_1 - z_label) + ld_1)
        tl.store(loss_ptr + row, loss)

        # ---- pass 3: gradient (columns >= V get 0: their loads are -inf, so q = p = 0) ----
        if WRITE_GRAD:
            scale = tl.load(scale_ptr)
            c_soft = scale * soft_scale * inv_t
            c_hard = scale * hard_weight
            for j0 in range(0, G_WIDTH, BLOCK):
                cols = j0 + offs
                inb = cols < V
                zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                lq = (zs * inv_t - m_s) - ld_s
                g = c_soft * _soft_grad(lq, (zt * inv_t - m_t) - ld_t, beta, aux, DIV)
                if HARD:
                    if T_IS_1:
                        q1 = tl.exp(lq)
                    else:
                        q1 = tl.exp((zs - m_1) - ld_1)
                    g += c_hard * (q1 - tl.where(cols == label, 1.0, 0.0))
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < G_WIDTH)
    else:
        # ignored row: 0; a label outside [0, V) on a row that counts: NaN (as the C++ kernels;
        # checking on the host would synchronise). Either way a zero gradient.
        tl.store(loss_ptr + row, tl.where(valid, float("nan"), 0.0))
        if WRITE_GRAD:
            zero_g = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
            for j0 in range(0, G_WIDTH, BLOCK):
                cols = j0 + offs
                tl.store(g_row + cols, zero_g, mask=cols < G_WIDTH)


def launch_options(block: int) -> dict:
    """num_warps for a tile, and a register cap of 128 (two 256-thread CTAs per SM); without a
    cap some ptxas versions aim for four CTAs (64 registers) and spill (triton 3.6, tvd)."""
    warps = 8 if block >= 2048 else 4
    return {"num_warps": warps} if interpreting() else {"num_warps": warps, "maxnreg": 128}


def block_size(width: int, cap: int = 2048) -> int:
    """Vocabulary tile: a power of two, at most `cap` (64 under the interpreter, so that small
    test shapes still cover several tiles). 2048 columns over 256 threads is 8 per thread: one
    or two 16-byte loads, and few enough live values that every divergence fits in 128
    registers (ptxas of triton 3.6 and 3.9; tests/test_aot.py)."""
    cap = 64 if interpreting() else cap
    return max(16, min(triton.next_power_of_2(max(width, 1)), cap))


def distill_forward(student, teacher, labels, opts, vocab, grad_scale, need_grad, grad_out=None):
    """Launcher with the contract of fastdistill.backends.torch_backend.distill_forward."""
    N, Vs = student.shape
    rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else student.new_empty(student.shape)
    if N == 0:
        return rows, grad
    if labels is not None:
        labels = labels.contiguous()
    block = block_size(Vs)
    distill_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0),
        labels if labels is not None else rows,
        grad if grad is not None else rows, grad.stride(0) if grad is not None else 0,
        rows, grad_scale,
        vocab, Vs, opts.ignore_index, opts.beta, 1.0 / opts.temperature, opts.soft_scale,
        opts.hard_weight,
        DIV=opts.kernel_code, HAS_LABELS=labels is not None,
        HARD=labels is not None and opts.hard_weight != 0.0,
        T_IS_1=opts.temperature == 1.0, WRITE_GRAD=grad is not None,
        BLOCK=block, **launch_options(block),
    )
    return rows, grad
