"""Logit-level distillation: loss per row and the student gradient, in one launch.

Two kernels; the launcher (distill_forward) picks one per call.

distill_row_kernel (sm_90 and newer, rows of up to ROW_MAX_COLUMNS columns): one program per row,
the whole row in registers. The row is NT tiles of TB columns (powers of two, NT <= 8: at most a
few percent of padding past V), spread over a thread-block cluster of num_ctas CTAs (Triton
places the tiles' columns across the cluster; reductions cross it through distributed shared
memory). HBM traffic is the floor: s and t read once, g written once. The math is in the log2
domain (divergence.h): the row's shifts m = k max z with k = mul * log2(e), exponentials
e = 2^(k z - m) (one fused multiply-add, one MUFU.EX2), probabilities q = e 2^-l with
l = log2 sum e, so that every exponential of the row is computed once: 2 MUFU operations per
element for the KL family and tvd, 3 for jsd (plus the log of the mixture), 4 for skew_*. Two
or three reductions per row (maxima; sums; the pass-2 sums), each of several operands at once.
The mixtures keep four values per column between their reductions; for rows too wide for that
(Qwen's V = 151936 in 16 CTAs) the LEAN variant keeps the raw logits only (16-bit rows: two
columns per register) and takes the exponentials and the mixture's logarithm again in passes 2
and 3: 5-6.5 MUFU operations per element instead of 3.1-4.1 (the sm_90 model), one HBM read.

distill_kernel (fallback: sm_80, wider rows, the interpreter when asked for it): one program
per row streams the row over vocabulary tiles of BLOCK columns with float32 running statistics
(online log-sum-exp, natural logarithms), and writes the gradient, already multiplied by the
reduction scale, in the forward pass. The math mirrors csrc/include/fastdistill/divergence.h (see
there for the formulas); both are tested against the float64 reference of fastdistill.reference.

Passes over a row and HBM traffic per row of the fallback (E = bytes per element, V columns):

  divergence                 passes                          bytes
  forward_kl, reverse_kl,    1: online LSEs + divergence     2 reads of s and t + 1 write of g
  symmetric_kl
                             3: gradient                     = V * (2 * (E_s + E_t) + E_s)
  jsd, skew_*, tvd           1: LSEs  2: loss, aux           3 reads + 1 write
                             3: gradient                     = V * (3 * (E_s + E_t) + E_s)
  ignored row                zero-fill                       V * E_s
  no gradient wanted         pass 3 skipped                  one read pass fewer, no write

Extra memory: the [N] float32 row losses. No atomics; the reduction over rows is a separate
deterministic torch.sum. Row offsets are int64 (N * V can pass 2^31). The helpers of the natural
log domain (_tile_stats, _merge, _pass2_terms, _soft_grad, ...) are shared with the fused linear
kernels of kernels/linear.py.
"""

import math

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
SKL = tl.constexpr(6)
FLT_MIN = tl.constexpr(1.17549435e-38)
LOG2E = 1.4426950408889634


@triton.jit
def _uses_wf(DIV: tl.constexpr):
    return (DIV == FKL) or (DIV == SKL)


@triton.jit
def _uses_wr(DIV: tl.constexpr):
    return (DIV == RKL) or (DIV == SKL)


@triton.jit
def mix_pair(beta, DIV: tl.constexpr):
    """(wp, wq) of the mixture M = wp P + wq Q (divergence.h: mix_weights): beta weighs P,
    except in the skew reverse KL, where it weighs Q."""
    if DIV == SRKL:
        wp = 1.0 - beta
        wq = beta
    else:
        wp = beta
        wq = 1.0 - beta
    return wp, wq


@triton.jit
def _mix_weights(beta, DIV: tl.constexpr):
    """(wp, wq, log wp, log wq) of the mixture M = wp P + wq Q."""
    wp, wq = mix_pair(beta, DIV)
    return wp, wq, tl.log(wp), tl.log(wq)


@triton.jit
def _mix_log(m, lp, lq, lwp, lwq):
    """log m, or the larger weighted term in the log domain where m underflows (mix_log)."""
    return tl.where(m >= FLT_MIN, tl.log(m), tl.maximum(lp + lwp, lq + lwq))


@triton.jit
def _pass2_terms(lq, lp, beta, DIV: tl.constexpr):
    """(loss terms, q * h terms) of the pass-2 divergences, elementwise."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == TVD:
        d = q - p
        loss = 0.5 * tl.abs(d)
        qh = q * tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))
    else:
        wp, wq, lwp, lwq = _mix_weights(beta, DIV)
        m = wp * p + wq * q
        lm = _mix_log(m, lp, lq, lwp, lwq)
        if DIV == JSD:
            tq = tl.where(q > 0, q * (lq - lm), 0.0)
            loss = tl.where(p > 0, beta * p * (lp - lm), 0.0) + (1.0 - beta) * tq
            qh = (1.0 - beta) * tq
        elif DIV == SFKL:
            loss = tl.where(p > 0, p * (lp - lm), 0.0)
            qh = -wq * q * (p / tl.maximum(m, FLT_MIN))
        else:  # SRKL
            loss = tl.where(q > 0, q * (lq - lm), 0.0)
            qh = tl.where(q > 0, q * (lq - lm - wq * (q / tl.maximum(m, FLT_MIN))), 0.0)
    return loss, qh


@triton.jit
def _soft_grad(lq, lp, beta, aux, DIV: tl.constexpr):
    """dD/da elementwise (a = s_mul z_s)."""
    q = tl.exp(lq)
    if DIV == FKL:
        g = q - tl.exp(lp)
    elif DIV == RKL:
        g = tl.where(q > 0, q * (lq - lp - aux), 0.0)
    elif DIV == SKL:
        g = beta * (q - tl.exp(lp)) + tl.where(q > 0, (1.0 - beta) * q * (lq - lp - aux), 0.0)
    elif DIV == TVD:
        d = q - tl.exp(lp)
        g = q * (tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0)) - aux)
    else:
        p = tl.exp(lp)
        wp, wq, lwp, lwq = _mix_weights(beta, DIV)
        m = wp * p + wq * q
        lm = _mix_log(m, lp, lq, lwp, lwq)
        if DIV == JSD:
            g = tl.where(q > 0, q * ((1.0 - beta) * (lq - lm) - aux), 0.0)
        elif DIV == SFKL:
            g = q * (-wq * (p / tl.maximum(m, FLT_MIN)) - aux)
        else:  # SRKL
            g = tl.where(q > 0, q * (lq - lm - wq * (q / tl.maximum(m, FLT_MIN)) - aux), 0.0)
    return g


@triton.jit
def _rescale(m_old, m_new):
    """exp(m_old - m_new), 0 when the side has seen nothing (m_old = -inf)."""
    return tl.where(m_old == float("-inf"), 0.0, tl.exp(m_old - m_new))


@triton.jit
def _shift_num(w, d, f, wm, wm_new, om, om_new):
    """A KL numerator relative to new maxima, times its rescale f (divergence.h:
    shift_numerator): 0 when its weighting side has seen nothing, +inf absorbing."""
    r = f * (w - ((wm_new - wm) - (om_new - om)) * d)
    r = tl.where(w == float("inf"), w, r)
    return tl.where(wm == float("-inf"), 0.0, r)


@triton.jit
def _merge(m_s, m_t, d_s, d_t, wf, wr, cm_s, cm_t, cd_s, cd_t, cwf, cwr, DIV: tl.constexpr):
    """Union of two pass-1 states (online_merge in divergence.h)."""
    ms = tl.maximum(m_s, cm_s)
    mt = tl.maximum(m_t, cm_t)
    xs = _rescale(m_s, ms)
    ys = _rescale(cm_s, ms)
    xt = _rescale(m_t, mt)
    yt = _rescale(cm_t, mt)
    if _uses_wf(DIV):
        wf = _shift_num(wf, d_t, xt, m_t, mt, m_s, ms) + \
            _shift_num(cwf, cd_t, yt, cm_t, mt, cm_s, ms)
    if _uses_wr(DIV):
        wr = _shift_num(wr, d_s, xs, m_s, ms, m_t, mt) + \
            _shift_num(cwr, cd_s, ys, cm_s, ms, cm_t, mt)
    return ms, mt, xs * d_s + ys * cd_s, xt * d_t + yt * cd_t, wf, wr


@triton.jit
def _empty_state(zero):
    """Pass-1 state before anything is seen, shaped like `zero` (a scalar or one per row):
    (m_s, m_t, d_s, d_t, wf, wr, m_1, d_1); m = -inf with d = 0 means "nothing finite yet"."""
    neg = zero + float("-inf")
    return neg, neg, zero, zero, zero, zero, neg, zero


@triton.jit
def _tile_stats(a, b, DIV: tl.constexpr, AXIS: tl.constexpr):
    """Pass-1 state of one tile of scaled logits a (student) and b (teacher), reduced along
    AXIS (the vocabulary): maxima, shifted sums and the KL numerators relative to the tile's
    maxima (wf_term / wr_term of divergence.h). Shared by the logit-level and the fused linear
    kernels."""
    NEG_INF: tl.constexpr = float("-inf")
    cm_s = tl.max(a, axis=AXIS)
    cm_t = tl.max(b, axis=AXIS)
    xs = a - tl.expand_dims(cm_s, AXIS)
    xt = b - tl.expand_dims(cm_t, AXIS)
    e_s = tl.where(a == NEG_INF, 0.0, tl.exp(xs))
    e_t = tl.where(b == NEG_INF, 0.0, tl.exp(xt))
    cwf = tl.zeros_like(cm_s)  # unused by the other divergences
    cwr = tl.zeros_like(cm_s)
    if _uses_wf(DIV):
        wt = tl.where(a == NEG_INF, float("inf"), e_t * (xt - xs))
        cwf = tl.sum(tl.where(b == NEG_INF, 0.0, wt), axis=AXIS)
    if _uses_wr(DIV):
        wt = tl.where(b == NEG_INF, float("inf"), e_s * (xs - xt))
        cwr = tl.sum(tl.where(a == NEG_INF, 0.0, wt), axis=AXIS)
    return cm_s, cm_t, tl.sum(e_s, axis=AXIS), tl.sum(e_t, axis=AXIS), cwf, cwr


@triton.jit
def _lse_merge(m, d, x, AXIS: tl.constexpr):
    """Plain online log-sum-exp update with one tile x, reduced along AXIS."""
    cm = tl.max(x, axis=AXIS)
    cd = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - tl.expand_dims(cm, AXIS))),
                axis=AXIS)
    m_new = tl.maximum(m, cm)
    return m_new, _rescale(m, m_new) * d + _rescale(cm, m_new) * cd


@triton.jit
def _row_ok(d_s, d_t):
    """Both distributions exist: shifted sums positive and finite (divergence.h: row_ok)."""
    return (d_s > 0) & (d_t > 0) & (d_s < float("inf")) & (d_t < float("inf"))


@triton.jit
def _pass1_divergence(d_s, d_t, wf, wr, beta, DIV: tl.constexpr):
    """(divergence after pass 1, KL(Q||P)) for the KL family; (0, 0) for the others."""
    ld_s = tl.log(d_s)
    ld_t = tl.log(d_t)
    fkl = wf / d_t - ld_t + ld_s
    rkl = wr / d_s - ld_s + ld_t
    if DIV == FKL:
        div = fkl
    elif DIV == RKL:
        div = rkl
    elif DIV == SKL:
        div = beta * fkl + (1.0 - beta) * rkl
    else:
        div = tl.zeros_like(d_s)
    if not _uses_wr(DIV):
        rkl = tl.zeros_like(d_s)
    return div, rkl


@triton.jit
def _grad_undefined(rkl, DIV: tl.constexpr):
    """An infinite reverse-KL term has no gradient (divergence.h: grad_undefined)."""
    if _uses_wr(DIV):
        bad = (rkl < float("inf")) == 0  # NaN or +inf (`~` on a scalar: interpreter)
    else:
        bad = rkl != rkl
    return bad


@triton.jit
def distill_kernel(
    s_ptr, s_stride, t_ptr, t_stride, labels_ptr, g_ptr, g_stride, loss_ptr, scale_ptr,
    V, G_WIDTH, ignore_index, beta, s_mul, t_mul, h_mul, soft_scale, hard_weight,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, SAME_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)
    NEG_INF: tl.constexpr = float("-inf")
    NAN: tl.constexpr = float("nan")

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
        # ---- pass 1: online statistics of a = s_mul z_s, b = t_mul z_t (and h_mul z_s) ----
        # Each tile's statistics relative to its own maxima, merged into the row's; wf / wr are
        # the one-pass KL numerators relative to the running maxima (see divergence.h).
        m_s, m_t, d_s, d_t, wf, wr, m_1, d_1 = _empty_state(tl.zeros([], dtype=tl.float32))
        for j0 in range(0, V, BLOCK):
            cols = j0 + offs
            inb = cols < V
            zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
            zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
            cm_s, cm_t, cd_s, cd_t, cwf, cwr = _tile_stats(zs * s_mul, zt * t_mul, DIV, 0)
            m_s, m_t, d_s, d_t, wf, wr = _merge(m_s, m_t, d_s, d_t, wf, wr, cm_s, cm_t, cd_s,
                                                cd_t, cwf, cwr, DIV)
            if HARD and not SAME_LSE:
                m_1, d_1 = _lse_merge(m_1, d_1, zs * h_mul, 0)
        ok = _row_ok(d_s, d_t)
        ld_s = tl.log(d_s)
        ld_t = tl.log(d_t)
        if HARD and not SAME_LSE:
            ld_1 = tl.log(d_1)
        else:
            m_1 = m_s
            ld_1 = ld_s
        div, aux = _pass1_divergence(d_s, d_t, wf, wr, beta, DIV)

        if (DIV != FKL) and (DIV != RKL) and (DIV != SKL):
            # ---- pass 2: loss and aux = sum q h ----
            acc_l = tl.zeros([BLOCK], dtype=tl.float32)
            acc_a = tl.zeros([BLOCK], dtype=tl.float32)
            if ok:
                for j0 in range(0, V, BLOCK):
                    cols = j0 + offs
                    inb = cols < V
                    zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                    zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                    lt, qh = _pass2_terms((zs * s_mul - m_s) - ld_s, (zt * t_mul - m_t) - ld_t,
                                          beta, DIV)
                    acc_l += tl.where(inb, lt, 0.0)
                    acc_a += tl.where(inb, qh, 0.0)
            div = tl.sum(acc_l, axis=0)
            aux = tl.sum(acc_a, axis=0)

        loss = soft_scale * div
        if HARD:
            z_label = tl.load(s_row + label).to(tl.float32) * h_mul
            # LSE - z[label] = (m - z[label]) + log d: no cancellation of large logits
            loss += hard_weight * ((m_1 - z_label) + ld_1)
        tl.store(loss_ptr + row, tl.where(ok, loss, NAN))

        # ---- pass 3: gradient (columns >= V get 0: their loads are -inf, so q = p = 0) ----
        if WRITE_GRAD:
            nan_row = (ok == 0) | _grad_undefined(aux, DIV)
            scale = tl.load(scale_ptr)
            c_soft = scale * soft_scale * s_mul
            c_hard = scale * hard_weight * h_mul
            for j0 in range(0, G_WIDTH, BLOCK):
                cols = j0 + offs
                inb = cols < V
                zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                lq = (zs * s_mul - m_s) - ld_s
                g = c_soft * _soft_grad(lq, (zt * t_mul - m_t) - ld_t, beta, aux, DIV)
                if HARD:
                    if SAME_LSE:
                        q1 = tl.exp(lq)
                    else:
                        q1 = tl.exp((zs * h_mul - m_1) - ld_1)
                    g += c_hard * (q1 - tl.where(cols == label, 1.0, 0.0))
                g = tl.where(nan_row & inb, NAN, g)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < G_WIDTH)
    else:
        # ignored row: 0; a label outside [0, V) on a row that counts: NaN (as the C++ kernels;
        # checking on the host would synchronise). Either way a zero gradient.
        tl.store(loss_ptr + row, tl.where(valid, NAN, 0.0))
        if WRITE_GRAD:
            zero_g = tl.zeros([BLOCK], dtype=g_ptr.dtype.element_ty)
            for j0 in range(0, G_WIDTH, BLOCK):
                cols = j0 + offs
                tl.store(g_row + cols, zero_g, mask=cols < G_WIDTH)


# ---- the row-resident kernel (log2 domain) ---------------------------------------------------

LN2 = tl.constexpr(0.6931471805599453)
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: the shift of a side that saw no value


@triton.jit
def _max_pair(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def _sum_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _sum_three(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _sum_four(a0, b0, c0, d0, a1, b1, c1, d1):
    return a0 + a1, b0 + b1, c0 + c1, d0 + d1


@triton.jit
def _sum_five(a0, b0, c0, d0, e0, a1, b1, c1, d1, e1):
    return a0 + a1, b0 + b1, c0 + c1, d0 + d1, e0 + e1


@triton.jit
def _ex2(x, FAST: tl.constexpr):
    """2^x: ex2.approx.ftz.f32 (one MUFU.EX2; fast_math.h states its error) in compiled code,
    tl.exp2 under the interpreter (which has no inline assembly)."""
    if FAST:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    """log2 x: lg2.approx.ftz.f32 (one MUFU.LG2) in compiled code, tl.log2 interpreted."""
    if FAST:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _sum_reduce(ds, dt, wf, wr, d1, DIV: tl.constexpr, HARD_SEP: tl.constexpr):
    """The row sums of the operands that DIV (and a hard loss with its own LSE) uses, in one
    reduction; the others 0."""
    USE_WF: tl.constexpr = _uses_wf(DIV)
    USE_WR: tl.constexpr = _uses_wr(DIV)
    if USE_WF and USE_WR:
        if HARD_SEP:
            ds, dt, wf, wr, d1 = tl.reduce((ds, dt, wf, wr, d1), 0, _sum_five)
        else:
            ds, dt, wf, wr = tl.reduce((ds, dt, wf, wr), 0, _sum_four)
            d1 = ds * 0.0
    elif USE_WF or USE_WR:
        w = wf + wr
        if HARD_SEP:
            ds, dt, w, d1 = tl.reduce((ds, dt, w, d1), 0, _sum_four)
        else:
            ds, dt, w = tl.reduce((ds, dt, w), 0, _sum_three)
            d1 = ds * 0.0
        if USE_WF:
            wf = w
            wr = ds * 0.0
        else:
            wr = w
            wf = ds * 0.0
    else:
        if HARD_SEP:
            ds, dt, d1 = tl.reduce((ds, dt, d1), 0, _sum_three)
        else:
            ds, dt = tl.reduce((ds, dt), 0, _sum_pair)
            d1 = ds * 0.0
        wf = ds * 0.0
        wr = ds * 0.0
    return ds, dt, wf, wr, d1


@triton.jit
def _row_sums_guarded(s_row, t_row, offs, V, ks, kt, kh, sh_s, sh_t, sh_1, DIV: tl.constexpr,
                      HARD_SEP: tl.constexpr, NT: tl.constexpr, TB: tl.constexpr,
                      FAST: tl.constexpr):
    """(d_s, d_t, wf, wr, d_1) of the row with the -inf rules of wf_term / wr_term
    (divergence.h): the rare path of a row with a -inf (or NaN) logit, which reloads the row (its
    exponentials are not kept for it)."""
    NEG_INF: tl.constexpr = float("-inf")
    ds = tl.zeros([TB], dtype=tl.float32)
    dt = ds
    wf = ds
    wr = ds
    d1 = ds
    for i in tl.static_range(NT):
        cols = i * TB + offs
        inb = cols < V
        zs = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
        zt = tl.load(t_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
        u = tl.fma(zs, ks, -sh_s)
        v = tl.fma(zt, kt, -sh_t)
        e = _ex2(u, FAST)
        f = _ex2(v, FAST)
        ds += e
        dt += f
        if _uses_wf(DIV):
            w = tl.where(u == NEG_INF, float("inf"), f * (v - u))
            wf += tl.where(v == NEG_INF, 0.0, w)
        if _uses_wr(DIV):
            w = tl.where(v == NEG_INF, float("inf"), e * (u - v))
            wr += tl.where(u == NEG_INF, 0.0, w)
        if HARD_SEP:
            d1 += _ex2(tl.fma(zs, kh, -sh_1), FAST)
    return _sum_reduce(ds, dt, wf, wr, d1, DIV, HARD_SEP)


@triton.jit
def _widen(x, FAST: tl.constexpr):
    """x as float32 where it is used, for the raw 16-bit logits the LEAN row kernel keeps: an
    opaque conversion (inline PTX, not pure) that the compiler cannot merge with the one of pass
    1 and so keep a float32 copy of the row alive (two columns per register instead of one)."""
    if FAST and x.dtype == tl.bfloat16:
        y = tl.inline_asm_elementwise("cvt.f32.bf16 $0, $1;", "=r,h", [x], dtype=tl.float32,
                                      is_pure=False, pack=1)
    elif FAST and x.dtype == tl.float16:
        y = tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [x], dtype=tl.float32,
                                      is_pure=False, pack=1)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _lean_lp2(z, k, sh, l, FAST: tl.constexpr):
    """log2 of the probability of a raw logit z kept by the LEAN row kernel: the fma of pass 1
    (u = k z - sh), minus the row's log2 sum l."""
    return tl.fma(_widen(z, FAST), k, -sh) - l


@triton.jit
def _mix_elem(q, p, lq2, lp2, beta, wp, wq, lwp2, lwq2, DIV: tl.constexpr,
              GUARD: tl.constexpr, FAST: tl.constexpr):
    """(loss term, q h, h) of one tile of the mixture divergences and tvd from the probabilities
    and their log2 (divergence.h: pass2_elem, in the unit of loss_unit). GUARD: the terms of
    pass2_elem where a probability is 0; without it plain (NaN at -inf logits)."""
    if DIV == TVD:
        d = q - p
        h = tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))
        lt = 0.5 * tl.abs(d)
        qh = q * h
    else:
        m = wp * p + wq * q
        lm2 = tl.maximum(_lg2(m, FAST), tl.maximum(lp2 + lwp2, lq2 + lwq2))
        dq = lq2 - lm2
        dp = lp2 - lm2
        if DIV == JSD:
            h = (1.0 - beta) * LN2 * dq
            tq = q * dq
            lp_term = beta * p * dp
            if GUARD:
                h = tl.where(q > 0, h, 0.0)
                tq = tl.where(q > 0, tq, 0.0)
                lp_term = tl.where(p > 0, lp_term, 0.0)
            lt = lp_term + (1.0 - beta) * tq
            qh = (1.0 - beta) * LN2 * tq
        elif DIV == SFKL:
            h = -wq * _ex2(dp, FAST)
            lt = p * dp
            if GUARD:
                h = tl.where(p > 0, h, 0.0)
                lt = tl.where(p > 0, lt, 0.0)
            qh = q * h
        else:  # SRKL
            h = LN2 * dq - wq * _ex2(dq, FAST)
            lt = q * dq
            if GUARD:
                h = tl.where(q > 0, h, 0.0)
                lt = tl.where(q > 0, lt, 0.0)
            qh = q * h
    return lt, qh, h


@triton.jit
def _row_pass2(us, ut, es, et, inb_last, ks, kt, sh_s, sh_t, l_s, l_t, ps, pt, beta, lwp2, lwq2,
               DIV: tl.constexpr, GUARD: tl.constexpr, LEAN: tl.constexpr, NT: tl.constexpr,
               FAST: tl.constexpr):
    """(sum of loss terms, aux = sum q h) of the mixture divergences and tvd, and h per tile
    (none with LEAN). q = e_s 2^-l_s, lq2 = u_s - l_s: no exponential more; LEAN (us, ut: the
    raw logits): u_s = fma(z_s, k_s, -sh_s) as in pass 1, q = 2^(u_s - l_s), p likewise. GUARD:
    see _mix_elem (the caller redoes the row with it where the plain sums are not finite)."""
    if LEAN:
        zero = tl.zeros_like(us[0].to(tl.float32))
    else:
        zero = tl.zeros_like(es[0])
    acc_l = zero
    acc_a = zero
    hs = ()
    wp, wq = mix_pair(beta, DIV)
    for i in tl.static_range(NT):
        lq2 = 0.0
        lp2 = 0.0
        if LEAN:
            lq2 = _lean_lp2(us[i], ks, sh_s, l_s, FAST)
            lp2 = _lean_lp2(ut[i], kt, sh_t, l_t, FAST)
        elif DIV != TVD:
            lq2 = us[i] - l_s
            lp2 = ut[i] - l_t
        if LEAN:
            q = _ex2(lq2, FAST)
            p = _ex2(lp2, FAST)
        else:
            q = es[i] * ps
            p = et[i] * pt
        lt, qh, h = _mix_elem(q, p, lq2, lp2, beta, wp, wq, lwp2, lwq2, DIV, GUARD, FAST)
        if i == NT - 1:
            lt = tl.where(inb_last, lt, 0.0)
            qh = tl.where(inb_last, qh, 0.0)
        acc_l += lt
        acc_a += qh
        if not LEAN:
            hs = hs + (h,)
    loss, aux = tl.reduce((acc_l, acc_a), 0, _sum_pair)
    return loss, aux, hs


@triton.jit
def distill_row_kernel(
    s_ptr, s_stride, t_ptr, t_stride, labels_ptr, g_ptr, g_stride, loss_ptr, scale_ptr,
    V, G_WIDTH, ignore_index, beta, ks, kt, kh, s_mul, h_mul, soft_scale, hard_weight,
    lwp2, lwq2,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, SAME_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, NT: tl.constexpr, TB: tl.constexpr, ZB: tl.constexpr,
    FAST: tl.constexpr, LEAN: tl.constexpr,
):
    """One row per program (a cluster of num_ctas CTAs), the row in registers: NT tiles of TB
    columns (columns >= V masked). ks, kt, kh: the multipliers times log2(e); lwp2, lwq2: log2
    of the mixture weights. ZB: the tile of the zero fills (ignored rows, columns past NT TB).
    LEAN (the mixtures, for wider rows): keep the raw logits only and take the exponentials and
    h again in passes 2 and 3 (2 values per column instead of 4)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    offs = tl.arange(0, TB)
    NEG_INF: tl.constexpr = float("-inf")
    NAN: tl.constexpr = float("nan")

    label = 0
    valid = True
    usable = True
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        usable = valid
        if HARD:
            usable = valid & (label >= 0) & (label < V)

    if usable:
        # the whole row: every load in flight at once
        zs = ()
        zt = ()
        for i in tl.static_range(NT):
            cols = i * TB + offs
            inb = cols < V
            a = tl.load(s_row + cols, mask=inb, other=NEG_INF)
            b = tl.load(t_row + cols, mask=inb, other=NEG_INF)
            if LEAN:  # kept as loaded (16-bit rows: half the registers), converted where used
                zs = zs + (a,)
                zt = zt + (b,)
            else:
                zs = zs + (a.to(tl.float32),)
                zt = zt + (b.to(tl.float32),)
        inb_last = (NT - 1) * TB + offs < V
        z_label = 0.0
        if HARD:
            z_label = tl.load(s_row + label).to(tl.float32)
        # shifts: k times the maxima of the raw logits (one reduction of both sides)
        ms_v = _widen(zs[0], FAST)
        mt_v = _widen(zt[0], FAST)
        for i in tl.static_range(1, NT):
            ms_v = tl.maximum(ms_v, _widen(zs[i], FAST))
            mt_v = tl.maximum(mt_v, _widen(zt[i], FAST))
        mzs, mzt = tl.reduce((ms_v, mt_v), 0, _max_pair)
        m_s = mzs * ks
        m_t = mzt * kt
        sh_s = tl.maximum(m_s, NEG_BIG)
        sh_t = tl.maximum(m_t, NEG_BIG)
        m_1 = mzs * kh
        sh_1 = tl.maximum(m_1, NEG_BIG)
        # exponentials and the pass-1 sums (divergence.h: Online), keeping per column only what
        # the later steps use (registers): e_s always; e_t where p is needed; the clamped
        # u_s - u_t of the reverse KL; u_s, u_t of the mixtures
        HARD_SEP: tl.constexpr = HARD and not SAME_LSE
        MIX: tl.constexpr = (DIV == JSD) or (DIV == SFKL) or (DIV == SRKL)
        KEEP_ES: tl.constexpr = not (MIX and LEAN)
        KEEP_ET: tl.constexpr = (DIV != RKL) and KEEP_ES
        KEEP_DX: tl.constexpr = (DIV == RKL) or (DIV == SKL)
        es = ()
        et = ()
        us = ()
        ut = ()
        dx = ()
        acc_s = tl.zeros([TB], dtype=tl.float32)
        acc_t = acc_s
        acc_wf = acc_s
        acc_wr = acc_s
        acc_1 = acc_s
        for i in tl.static_range(NT):
            u = tl.fma(_widen(zs[i], FAST), ks, -sh_s)
            v = tl.fma(_widen(zt[i], FAST), kt, -sh_t)
            e = _ex2(u, FAST)
            f = _ex2(v, FAST)
            acc_s += e
            acc_t += f
            if _uses_wf(DIV):  # unguarded: a -inf logit makes it NaN (then the guarded path)
                w = f * (v - u)
                if i == NT - 1:
                    w = tl.where(inb_last, w, 0.0)
                acc_wf += w
            if _uses_wr(DIV):
                w = e * (u - v)
                if i == NT - 1:
                    w = tl.where(inb_last, w, 0.0)
                acc_wr += w
            if HARD_SEP:
                acc_1 += _ex2(tl.fma(_widen(zs[i], FAST), kh, -sh_1), FAST)
            if KEEP_ES:
                es = es + (e,)
            if KEEP_ET:
                et = et + (f,)
            if KEEP_DX:
                dx = dx + (tl.maximum(u, -1e30) - tl.maximum(v, -1e35),)
            if MIX and not LEAN:
                us = us + (u,)
                ut = ut + (v,)
        if MIX and LEAN:  # the raw logits: u again by the same fma in passes 2 and 3
            us = zs
            ut = zt
        d_s, d_t, wf, wr, d_1 = _sum_reduce(acc_s, acc_t, acc_wf, acc_wr, acc_1, DIV, HARD_SEP)
        if ((wf + wr) - (wf + wr)) != 0.0:  # a -inf (or NaN) logit: the guarded terms
            d_s, d_t, wf, wr, d_1 = _row_sums_guarded(s_row, t_row, offs, V, ks, kt, kh, sh_s,
                                                      sh_t, sh_1, DIV, HARD_SEP, NT, TB, FAST)
        ok = _row_ok(d_s, d_t)
        l_s = tl.log2(d_s)
        l_t = tl.log2(d_t)
        ps = tl.exp2(-l_s)
        pt = tl.exp2(-l_t)
        fkl2 = wf / d_t - l_t + l_s
        w_r = wr / d_s
        if _uses_wr(DIV):
            # the reverse numerator's terms can be large (logits of 1e4: 1e5 each) and their
            # float32 sum loses the digits the gradient q (lq - lp - KL) needs: once more, as
            # residuals about their mean (finite rows only)
            if (w_r - w_r) == 0.0:
                res = tl.zeros_like(es[0])
                for i in tl.static_range(NT):
                    r_i = es[i] * (dx[i] - w_r)
                    if i == NT - 1:
                        r_i = tl.where(inb_last, r_i, 0.0)
                    res += tl.where(es[i] > 0, r_i, 0.0)
                w_r += tl.sum(res, 0) / d_s
        rkl2 = w_r - l_s + l_t
        if HARD_SEP:
            l_1 = tl.log2(d_1)
        else:
            m_1 = m_s
            l_1 = l_s

        aux = rkl2  # reverse / symmetric KL: KL(Q||P) / ln 2
        if DIV == FKL:
            div = LN2 * fkl2
        elif DIV == RKL:
            div = LN2 * rkl2
        elif DIV == SKL:
            div = LN2 * (beta * fkl2 + (1.0 - beta) * rkl2)
        else:
            lsum, aux, hs = _row_pass2(us, ut, es, et, inb_last, ks, kt, sh_s, sh_t, l_s, l_t,
                                       ps, pt, beta, lwp2, lwq2, DIV, False, LEAN, NT, FAST)
            if ((lsum + aux) - (lsum + aux)) != 0.0:
                lsum, aux, hs = _row_pass2(us, ut, es, et, inb_last, ks, kt, sh_s, sh_t, l_s,
                                           l_t, ps, pt, beta, lwp2, lwq2, DIV, True, LEAN, NT,
                                           FAST)
            if DIV == TVD:
                div = lsum
            else:
                div = LN2 * lsum

        loss = soft_scale * div
        if HARD:
            # CE = (m_1 - k_h z[label] + l_1) ln 2, the difference by one fused multiply-add
            loss += hard_weight * LN2 * (l_1 - tl.fma(z_label, kh, -m_1))
        tl.store(loss_ptr + row, tl.where(ok, loss, NAN))

        if WRITE_GRAD:
            nan_row = (ok == 0) | _grad_undefined(aux, DIV)
            scale = tl.load(scale_ptr)
            cs = scale * soft_scale * s_mul
            ch = scale * hard_weight * h_mul
            # the KL family from the exponentials: g = e_s (a1 x + b1) - c1 e_t,
            # x = u_s - u_t - (l_s - l_t + aux) (divergence.h, distill_cuda.cu: GradConsts)
            if DIV == FKL:
                r = 1.0
            elif DIV == RKL:
                r = 0.0
            else:
                r = beta
            fold = 0.0
            if HARD and SAME_LSE:
                fold = ch
            a1 = (1.0 - r) * LN2 * cs * ps
            b1 = (r * cs + fold) * ps
            c1 = r * cs * pt
            x0 = l_s - l_t + aux
            wp, wq = mix_pair(beta, DIV)
            for i in tl.static_range(NT):
                cols = i * TB + offs
                if DIV == FKL:
                    g = es[i] * b1 - et[i] * c1
                elif (DIV == RKL) or (DIV == SKL):
                    g = es[i] * (a1 * (dx[i] - x0) + b1)
                    if DIV == SKL:
                        g = g - c1 * et[i]
                elif MIX and LEAN:
                    lq2 = _lean_lp2(us[i], ks, sh_s, l_s, FAST)
                    lp2 = _lean_lp2(ut[i], kt, sh_t, l_t, FAST)
                    q = _ex2(lq2, FAST)
                    # h with the guards: 0 where a probability is 0, as pass 2 gave it
                    _, _, h = _mix_elem(q, _ex2(lp2, FAST), lq2, lp2, beta, wp, wq, lwp2, lwq2,
                                        DIV, True, FAST)
                    g = cs * q * (h - aux)
                    if HARD and SAME_LSE:
                        g += ch * q
                else:
                    q = es[i] * ps
                    g = cs * q * (hs[i] - aux)
                    if HARD and SAME_LSE:
                        g += ch * q
                if HARD:
                    if not SAME_LSE:
                        # the softmax of h_mul z_s, from the student logits loaded again (not
                        # kept: registers); each thread reloads the columns it stores next
                        zh = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32)
                        g += ch * _ex2(tl.fma(zh, kh, -m_1) - l_1, FAST)
                    g = tl.where(cols == label, g - ch, g)
                g = tl.where(nan_row, NAN, g)
                if i == NT - 1:
                    g = tl.where(cols < V, g, 0.0)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < G_WIDTH)
            # columns past the tiles (a gradient wider than NT TB)
            zero_g = tl.zeros([ZB], dtype=g_ptr.dtype.element_ty)
            zoffs = tl.arange(0, ZB)
            for j0 in range(NT * TB, G_WIDTH, ZB):
                tl.store(g_row + j0 + zoffs, zero_g, mask=j0 + zoffs < G_WIDTH)
    else:
        tl.store(loss_ptr + row, tl.where(valid, NAN, 0.0))
        if WRITE_GRAD:
            zero_g = tl.zeros([ZB], dtype=g_ptr.dtype.element_ty)
            zoffs = tl.arange(0, ZB)
            for j0 in range(0, G_WIDTH, ZB):
                tl.store(g_row + j0 + zoffs, zero_g, mask=j0 + zoffs < G_WIDTH)


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


# The compute capability assumed for tensors that are not on a CUDA device (CPU tensors under the
# interpreter; meta tensors when fastdistill.bench.aot records launches for a GPU target).
VIRTUAL_CAPABILITY = (9, 0)
# The row kernel holds at most ROW_ELEMS columns of each input per thread, in a cluster of at most
# 16 CTAs of ROW_WARPS warps.
ROW_ELEMS = 32
ROW_WARPS = 16
ROW_MAX_COLUMNS = ROW_ELEMS * 16 * 32 * ROW_WARPS
# ... and at most this many for the mixtures and the symmetric KL, which keep four or three values
# per column between their reductions (registers; the others two), for float32 rows and for
# unaligned rows
ROW_ELEMS_MIX = 16
# ... and, LEAN (the raw logits kept, the exponentials taken again), twice that for the mixtures,
# up to 24 columns (row_elems_lean)
ROW_ELEMS_LEAN = 24


def capability(device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return VIRTUAL_CAPABILITY


def row_elems(divergence: int, elem_bytes: int, aligned: bool, hard: bool) -> int:
    """Columns of each input a thread of the row kernel may hold without spilling registers
    (ptxas of triton 3.9, tests/test_aot.py): 32 for the forward / reverse KL and tvd of 16-bit
    aligned rows, which keep two values per column between reductions; 16 with a hard loss, for
    the mixtures and the symmetric KL (three or four values), float32 rows and unaligned rows
    (element loads); 8 for those with a hard loss in float32 and for the symmetric KL with a
    hard loss (the streaming kernel then takes rows wider than 16 x 512 x 8 columns)."""
    two_values = divergence in (0, 1, 5)
    if elem_bytes == 2 and aligned and not hard and two_values:
        return ROW_ELEMS
    if hard and not two_values and (elem_bytes == 4 or divergence == 6):
        return 8
    return ROW_ELEMS_MIX


def row_elems_lean(divergence: int, elems: int, hard: bool) -> int:
    """Columns of each input a thread of the LEAN row kernel (the mixtures, two values per
    column) may hold without spilling (ptxas of triton 3.9, sm_90, aligned and unaligned rows):
    twice `elems` (row_elems), at most 24 (32, what V = 256000 needs, spills 16-368 bytes);
    16 for skew_forward_kl with a hard loss (24 spills 8 bytes)."""
    cap = 16 if (divergence == 3 and hard) else ROW_ELEMS_LEAN
    return min(2 * elems, cap)


def row_plan(width: int, elem_bytes: int, cap: tuple, warps: int = ROW_WARPS,
             elems: int = ROW_ELEMS, aligned: bool = True):
    """(NT, TB, num_ctas, num_warps) of the row kernel for rows of `width` columns, or None
    (the streaming kernel). NT tiles of TB columns (a power of two; NT <= 8) cover the row;
    with `aligned` rows (16-byte aligned starts) every thread holds whole 16-byte vectors of
    each tile (TB >= 16 / elem_bytes columns per thread of the cluster; unaligned rows load
    element by element, and smaller tiles pad less); at most `elems` columns of each input per
    thread; the cluster is the smallest (1 to 16 CTAs) that allows it."""
    if cap < (9, 0):
        return None
    vec = 16 // elem_bytes if aligned else 1
    w = max(1, min(warps, triton.next_power_of_2(max(width, 1)) // (32 * vec)))
    threads = 32 * w
    for ctas in (1, 2, 4, 8, 16):
        tb = max(triton.next_power_of_2(-(-width // 8)), vec * ctas * threads)
        nt = -(-width // tb)
        if nt * tb <= elems * ctas * threads:
            return nt, tb, ctas, w
    return None


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
    common = (student, student.stride(0), teacher, teacher.stride(0),
              labels if labels is not None else rows,
              grad if grad is not None else rows, grad.stride(0) if grad is not None else 0,
              rows, grad_scale)
    flags = dict(DIV=opts.divergence, HAS_LABELS=labels is not None,
                 HARD=labels is not None and opts.hard_weight != 0.0,
                 SAME_LSE=opts.same_lse, WRITE_GRAD=grad is not None)
    aligned = all(x is None or (x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0)
                  for x in (student, teacher, grad))
    hard = labels is not None and opts.hard_weight != 0.0
    elems = row_elems(opts.divergence, student.element_size(), aligned, hard)
    cap = capability(student.device)
    plan = row_plan(vocab, student.element_size(), cap, elems=elems, aligned=aligned)
    lean = False
    if plan is None and opts.divergence in (2, 3, 4):
        # the mixtures keep four values per column; with two (LEAN), wider rows fit
        lean_elems = row_elems_lean(opts.divergence, elems, hard)
        plan = row_plan(vocab, student.element_size(), cap, elems=lean_elems, aligned=aligned)
        lean = plan is not None
    if plan is not None:
        nt, tb, ctas, warps = plan
        lwp2 = lwq2 = 0.0
        if opts.divergence in (2, 3, 4):  # jsd, skew_*: log2 of the mixture weights
            wp = 1.0 - opts.beta if opts.divergence == 4 else opts.beta
            lwp2, lwq2 = (math.log2(w) if w > 0 else -math.inf for w in (wp, 1.0 - wp))
        launch = {"num_warps": warps} if interpreting() else {"num_warps": warps, "num_ctas": ctas}
        distill_row_kernel[(N,)](
            *common, vocab, Vs, opts.ignore_index, opts.beta, opts.s_mul * LOG2E,
            opts.t_mul * LOG2E, opts.h_mul * LOG2E, opts.s_mul, opts.h_mul, opts.soft_scale,
            opts.hard_weight, lwp2, lwq2, **flags, NT=nt, TB=tb, ZB=block_size(Vs),
            FAST=not interpreting(), LEAN=lean, **launch)
        return rows, grad
    block = block_size(Vs)
    distill_kernel[(N,)](
        *common, vocab, Vs, opts.ignore_index, opts.beta, opts.s_mul, opts.t_mul, opts.h_mul,
        opts.soft_scale, opts.hard_weight, **flags, BLOCK=block, **launch_options(block),
    )
    return rows, grad
