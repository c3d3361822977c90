"""Logit-level distillation: loss per row and the student gradient, in one launch.

One program per row streams the row over vocabulary tiles of BLOCK columns with float32 running
statistics (online log-sum-exp), and writes the gradient, already multiplied by the reduction
scale, in the forward pass. The math mirrors csrc/include/fastdistill/divergence.h (see there
for the formulas); both are tested against the float64 reference of fastdistill.reference.

Passes over a row and HBM traffic per row (E = bytes per element of the inputs, V columns):

  divergence                 passes                          bytes
  forward_kl, reverse_kl,    1: online LSEs + divergence     2 reads of s and t + 1 write of g
  symmetric_kl
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
SKL = tl.constexpr(6)
FLT_MIN = tl.constexpr(1.17549435e-38)


@triton.jit
def _uses_wf(DIV: tl.constexpr):
    return (DIV == FKL) or (DIV == SKL)


@triton.jit
def _uses_wr(DIV: tl.constexpr):
    return (DIV == RKL) or (DIV == SKL)


@triton.jit
def _mix_weights(beta, DIV: tl.constexpr):
    """(wp, wq, log wp, log wq) of the mixture M = wp P + wq Q (divergence.h: mix_weights)."""
    if DIV == SRKL:
        wp = 1.0 - beta
        wq = beta
    else:
        wp = beta
        wq = 1.0 - beta
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
        vocab, Vs, opts.ignore_index, opts.beta, opts.s_mul, opts.t_mul, opts.h_mul,
        opts.soft_scale, opts.hard_weight,
        DIV=opts.divergence, HAS_LABELS=labels is not None,
        HARD=labels is not None and opts.hard_weight != 0.0,
        SAME_LSE=opts.same_lse, WRITE_GRAD=grad is not None,
        BLOCK=block, **launch_options(block),
    )
    return rows, grad
