"""Fused linear distillation (mode="fused"): lm_head matmuls + divergence, no logits in memory.

Forward. The grid tiles rows (BLOCK_M) x vocabulary splits; a program computes the student and
teacher logit tiles [BLOCK_M, BLOCK_N] with tl.dot into float32 accumulators (never rounded to
16 bits), applies bias / softcap / temperature and folds them into per-row online statistics
(the same merge as fastdistill/kernels/distill.py). It writes one partial state per (row, split); a small
kernel merges the splits of each row in a fixed order (deterministic, no atomics, no locks).
Forward and reverse KL need this one sweep; jsd, skew_* and tvd need a second sweep over the
same tiles for their row sums (pass 2), i.e. twice the forward GEMM work.

Backward. The gradient w.r.t. the logits is recomputed tile by tile from the stored per-row
statistics (and grad_output, folded in per row) by a fused kernel that writes it, for one
vocabulary chunk of CHUNK_V columns at a time, into a [N, CHUNK_V] buffer in the weight dtype;
two GEMMs per chunk then give grad_hidden (accumulated in float32) and that chunk's grad_weight.
No [N, V] tensor exists at any point: extra memory is O(N * CHUNK_V), independent of V.

GEMM work, in units of 2 * N * V * D (Ds = Dt = D): forward 2 (student + teacher), backward
recompute 2 + grad_hidden 1 + grad_weight 1: 6 against the floor of 4 (1.5x); +2 for the pass-2
divergences. A fully fused backward that keeps grad tiles on chip would need either atomics
(not deterministic) or a recompute per output column block (D / BLOCK times the work) at
D = 4096, hence the staged chunk.
"""

import torch
import triton
import triton.language as tl

from fastdistill.kernels import interpreting, multiprocessor_count
from fastdistill.kernels.distill import (_empty_state, _grad_undefined, _lse_merge, _merge,
                                        _pass1_divergence, _pass2_terms, _rescale, _soft_grad,
                                        _tile_stats)

# Partial pass-1 state per (row, vocabulary split), N_PART floats, in this slot order:
P_MS, P_DS, P_MT, P_DT, P_WF, P_WR, P_M1, P_D1, P_ZL = (tl.constexpr(i) for i in range(9))
N_PART = 9
# Final per-row statistics [N, N_ROW], in this slot order (log-sum-exps as max, log of the
# shifted sum; aux = sum q h, or KL(Q||P) for the reverse / symmetric KL; z_label the label's
# logit):
ROW_SLOTS = ("m_s", "ld_s", "m_t", "ld_t", "aux", "m_1", "ld_1", "z_label")
S_MS, S_LDS, S_MT, S_LDT, S_AUX, S_M1, S_LD1, S_ZL = (tl.constexpr(i) for i in range(8))
N_ROW = len(ROW_SLOTS)
NPART = tl.constexpr(N_PART)
NROW = tl.constexpr(N_ROW)


@triton.jit
def _tanh(x):
    # tanh from exp: saturates cleanly at +-1 for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot_tile(h_ptr, w_ptr, rows, cols, row_in, col_in, D, h_stride, w_stride,
              PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """hidden[rows] @ weight[cols].T in float32: [len(rows), len(cols)], K-loop over D."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * h_stride + kk[None, :],
                    mask=row_in[:, None] & (kk[None, :] < D), other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * w_stride + kk[:, None],
                    mask=col_in[None, :] & (kk[:, None] < D), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logit_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tlog_ptr, rows, cols, N, V,
                 Ds, Dt, hs_stride, ws_stride, ht_stride, wt_stride, tlog_stride, s_scale, t_scale,
                 s_cap, t_cap,
                 HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, DENSE_T: tl.constexpr,
                 S_CAP: tl.constexpr, T_CAP: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Student and teacher logits of the [rows x cols] tile in float32 (after bias, logit scale
    and softcap; before the temperature), and tanh(scale z_s / cap) for the softcap chain
    rule."""
    row_in = rows < N
    col_in = cols < V
    S = _dot_tile(hs_ptr, ws_ptr, rows, cols, row_in, col_in, Ds, hs_stride, ws_stride,
                  PRECISION, BLOCK_K)
    if HAS_SB:
        S += tl.load(bs_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    S = S * s_scale
    th = S
    if S_CAP:
        th = _tanh(S / s_cap)
        S = th * s_cap
    if DENSE_T:
        T = tl.load(tlog_ptr + rows[:, None].to(tl.int64) * tlog_stride + cols[None, :],
                    mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
    else:
        T = _dot_tile(ht_ptr, wt_ptr, rows, cols, row_in, col_in, Dt, ht_stride, wt_stride,
                      PRECISION, BLOCK_K)
        if HAS_TB:
            T += tl.load(bt_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    T = T * t_scale
    if T_CAP:
        T = _tanh(T / t_cap) * t_cap
    NEG_INF: tl.constexpr = float("-inf")
    S = tl.where(col_in[None, :], S, NEG_INF)
    T = tl.where(col_in[None, :], T, NEG_INF)
    return S, T, th


@triton.jit(do_not_specialize=["N", "cols_per_split", "n_splits"])
def linear_stats_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tlog_ptr, labels_ptr, stats_ptr, part_ptr,
    N, V, Ds, Dt, hs_stride, ws_stride, ht_stride, wt_stride, tlog_stride, cols_per_split,
    n_splits, inv_t, s_scale, t_scale, s_cap, t_cap, beta,
    DIV: tl.constexpr, PASS: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
    SAME_LSE: tl.constexpr, HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, DENSE_T: tl.constexpr,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """PASS 1: partial online statistics per (row, split) -> part [N, n_splits, N_PART].
    PASS 2: partial (loss, aux) sums per (row, split) from the final stats -> part[..., :2]."""
    # the splits of a row block are consecutive programs: the programs resident at the same
    # time cover a few row blocks (their hidden rows stay in L2) x every split
    pid_m = tl.program_id(0) // n_splits
    split = tl.program_id(0) % n_splits
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    label = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_in, other=0)
    if PASS == 1:
        m_s, m_t, d_s, d_t, wf, wr, m_1, d_1 = _empty_state(zero)
        z_lab = zero
    else:
        st = stats_ptr + rows.to(tl.int64) * NROW
        m_s = tl.load(st + S_MS, mask=row_in, other=0.0)
        ld_s = tl.load(st + S_LDS, mask=row_in, other=0.0)
        m_t = tl.load(st + S_MT, mask=row_in, other=0.0)
        ld_t = tl.load(st + S_LDT, mask=row_in, other=0.0)
        acc_l = zero
        acc_a = zero
    c_begin = split * cols_per_split
    for n0 in range(c_begin, c_begin + cols_per_split, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        S, T, th = _logit_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tlog_ptr, rows,
                                cols, N, V, Ds, Dt, hs_stride, ws_stride, ht_stride, wt_stride,
                                tlog_stride, s_scale, t_scale, s_cap, t_cap, HAS_SB, HAS_TB,
                                DENSE_T, S_CAP, T_CAP, PRECISION, BLOCK_K)
        a = S * inv_t
        b = T * inv_t
        if PASS == 1:
            cm_s, cm_t, cd_s, cd_t, cwf, cwr = _tile_stats(a, b, DIV, 1)
            m_s, m_t, d_s, d_t, wf, wr = _merge(m_s, m_t, d_s, d_t, wf, wr, cm_s, cm_t, cd_s,
                                                cd_t, cwf, cwr, DIV)
            if HARD:
                z_lab += tl.sum(tl.where(cols[None, :] == label[:, None], S, 0.0), axis=1)
                if not SAME_LSE:
                    m_1, d_1 = _lse_merge(m_1, d_1, S, 1)
        else:
            lt, qh = _pass2_terms((a - m_s[:, None]) - ld_s[:, None],
                                  (b - m_t[:, None]) - ld_t[:, None], beta, DIV)
            # columns >= V are -inf on both sides: their terms are exactly 0
            acc_l += tl.sum(lt, axis=1)
            acc_a += tl.sum(qh, axis=1)
    p = part_ptr + (rows.to(tl.int64) * n_splits + split) * NPART
    if PASS == 1:
        tl.store(p + P_MS, m_s, mask=row_in)
        tl.store(p + P_DS, d_s, mask=row_in)
        tl.store(p + P_MT, m_t, mask=row_in)
        tl.store(p + P_DT, d_t, mask=row_in)
        tl.store(p + P_WF, wf, mask=row_in)
        tl.store(p + P_WR, wr, mask=row_in)
        tl.store(p + P_M1, m_1, mask=row_in)
        tl.store(p + P_D1, d_1, mask=row_in)
        tl.store(p + P_ZL, z_lab, mask=row_in)
    else:
        tl.store(p + 0, acc_l, mask=row_in)
        tl.store(p + 1, acc_a, mask=row_in)


@triton.jit(do_not_specialize=["N", "n_splits"])
def linear_finish_kernel(part_ptr, stats_ptr, div_ptr, N, n_splits, beta, DIV: tl.constexpr,
                         PASS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merges the splits of each row in a fixed order.
    PASS 1: stats [N, N_ROW] and div [N] (the divergence of the KL family, 0 otherwise).
    PASS 2: stats[:, S_AUX] = aux and div = the divergence (sums over the splits)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < N
    NEG_INF: tl.constexpr = float("-inf")
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    base = part_ptr + rows.to(tl.int64) * n_splits * NPART
    st = stats_ptr + rows.to(tl.int64) * NROW
    if PASS == 1:
        m_s, m_t, d_s, d_t, wf, wr, m_1, d_1 = _empty_state(zero)
        z_lab = zero
        for sp in range(0, n_splits):
            p = base + sp * NPART
            m_s, m_t, d_s, d_t, wf, wr = _merge(
                m_s, m_t, d_s, d_t, wf, wr,
                tl.load(p + P_MS, mask=row_in, other=NEG_INF),
                tl.load(p + P_MT, mask=row_in, other=NEG_INF),
                tl.load(p + P_DS, mask=row_in, other=0.0),
                tl.load(p + P_DT, mask=row_in, other=0.0),
                tl.load(p + P_WF, mask=row_in, other=0.0),
                tl.load(p + P_WR, mask=row_in, other=0.0), DIV)
            cm = tl.load(p + P_M1, mask=row_in, other=NEG_INF)
            m_new = tl.maximum(m_1, cm)
            d_1 = _rescale(m_1, m_new) * d_1 + \
                _rescale(cm, m_new) * tl.load(p + P_D1, mask=row_in, other=0.0)
            m_1 = m_new
            z_lab += tl.load(p + P_ZL, mask=row_in, other=0.0)
        div, rkl = _pass1_divergence(d_s, d_t, wf, wr, beta, DIV)
        tl.store(st + S_MS, m_s, mask=row_in)
        tl.store(st + S_LDS, tl.log(d_s), mask=row_in)
        tl.store(st + S_MT, m_t, mask=row_in)
        tl.store(st + S_LDT, tl.log(d_t), mask=row_in)
        tl.store(st + S_AUX, rkl, mask=row_in)
        tl.store(st + S_M1, m_1, mask=row_in)
        tl.store(st + S_LD1, tl.log(d_1), mask=row_in)
        tl.store(st + S_ZL, z_lab, mask=row_in)
        tl.store(div_ptr + rows, div, mask=row_in)
    else:
        loss = zero
        aux = zero
        for sp in range(0, n_splits):
            p = base + sp * NPART
            loss += tl.load(p + 0, mask=row_in, other=0.0)
            aux += tl.load(p + 1, mask=row_in, other=0.0)
        tl.store(st + S_AUX, aux, mask=row_in)
        tl.store(div_ptr + rows, loss, mask=row_in)


# N (tokens) is not specialised: a new batch size does not recompile. c0 and c_width are (the
# chunk width is a multiple of 128, so c0 always divides by 16; only the last chunk differs):
# without their divisibility the store offsets cost 30 more registers and the heaviest variant
# (jsd, hard loss, softcap) spills.
@triton.jit(do_not_specialize=["N"])
def linear_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tlog_ptr, labels_ptr, stats_ptr, rowf_ptr,
    g_ptr, g_stride, c0, c_width,
    N, V, Ds, Dt, hs_stride, ws_stride, ht_stride, wt_stride, tlog_stride,
    inv_t, s_scale, t_scale, s_cap, t_cap, beta, soft_scale, hard_weight, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, SAME_LSE: tl.constexpr,
    HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, DENSE_T: tl.constexpr, S_CAP: tl.constexpr,
    T_CAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """G[r, j - c0] = d loss / d (h_s w_s^T + b_s)[r, j] for columns j in [c0, c0 + c_width),
    times the per-row factor rowf (grad_output x reduction scale). Ignored rows get exact
    zeros: they are masked, not multiplied by 0 (their statistics may be NaN, e.g. an all -inf
    padding row of teacher logits, and 0 x NaN would reach grad_weight through the GEMM). NaN
    in counted rows without distributions or with an infinite reverse KL (divergence.h)."""
    # tiles in groups of GROUP_M row blocks, column blocks within a group: the resident
    # programs share a few row blocks' hidden rows (from L2) and their weight tiles
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    n_n = tl.cdiv(c_width, BLOCK_N)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = c0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    keep = row_in
    label = tl.full([BLOCK_M], -1, dtype=tl.int64)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_in, other=-1)
        keep = row_in & (label != ignore_index)
    S, T, th = _logit_tiles(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, tlog_ptr, rows, cols,
                            N, V, Ds, Dt, hs_stride, ws_stride, ht_stride, wt_stride,
                            tlog_stride, s_scale, t_scale, s_cap, t_cap, HAS_SB, HAS_TB, DENSE_T,
                            S_CAP, T_CAP, PRECISION, BLOCK_K)
    st = stats_ptr + rows.to(tl.int64) * NROW
    m_s = tl.load(st + S_MS, mask=row_in, other=0.0)
    ld_s = tl.load(st + S_LDS, mask=row_in, other=0.0)
    m_t = tl.load(st + S_MT, mask=row_in, other=0.0)
    ld_t = tl.load(st + S_LDT, mask=row_in, other=0.0)
    aux = tl.load(st + S_AUX, mask=row_in, other=0.0)
    f = tl.load(rowf_ptr + rows, mask=row_in, other=0.0)
    lq = (S * inv_t - m_s[:, None]) - ld_s[:, None]
    g = (f * soft_scale * inv_t)[:, None] * \
        _soft_grad(lq, (T * inv_t - m_t[:, None]) - ld_t[:, None], beta, aux[:, None], DIV)
    if HARD:
        if SAME_LSE:
            q1 = tl.exp(lq)
        else:
            m_1 = tl.load(st + S_M1, mask=row_in, other=0.0)
            ld_1 = tl.load(st + S_LD1, mask=row_in, other=0.0)
            q1 = tl.exp((S - m_1[:, None]) - ld_1[:, None])
        g += (f * hard_weight)[:, None] * (q1 - tl.where(cols[None, :] == label[:, None], 1.0, 0.0))
    if S_CAP:
        g = g * (s_scale * (1.0 - th * th))
    else:
        g = g * s_scale
    # both distributions exist (divergence.h: row_ok) <=> both log shifted sums are finite
    ok = (tl.abs(ld_s) < float("inf")) & (tl.abs(ld_t) < float("inf"))
    ok = ok & (_grad_undefined(aux, DIV) == 0)
    g = tl.where(ok[:, None], g, float("nan"))
    g = tl.where((cols < V)[None, :] & keep[:, None], g, 0.0)
    out = g_ptr + rows[:, None].to(tl.int64) * g_stride + (cols - c0)[None, :]
    tl.store(out, g.to(g_ptr.dtype.element_ty),
             mask=row_in[:, None] & ((cols - c0) < c_width)[None, :])


# ---- launchers ------------------------------------------------------------------------------------

def _tiles(dtype, kernel="grad"):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps). The stats kernel keeps two accumulators and the
    online-softmax temporaries live at once, so it takes half the vocabulary tile of the grad
    kernel to stay within the register file (checked: no spills, tests/test_aot.py). Larger
    tiles spill on sm_90 (triton 3.9, 8 warps, 255 registers): stats 128 x 64 (8-40 bytes of
    stack in 10 of 14 variants), 128 x 128 (up to 1.8 KB); grad 64 x 256 (up to 1.3 KB).
    Grad 128 x 64 fits (208-254 registers) but gives the same m64n64 warpgroup MMA."""
    if interpreting():
        return 16, 32, 16, 4  # small, so interpreter tests stay quick
    if dtype == torch.float32:
        return 64, 64 if kernel == "grad" else 32, 32, 4
    return 64, 128 if kernel == "grad" else 64, 64, 8


def _launch_options(warps):
    # ptxas otherwise targets two CTAs per SM for some variants (128 registers) and spills;
    # one 256-thread CTA per SM can use up to 255 registers
    return {"num_warps": warps} if interpreting() else {"num_warps": warps, "maxnreg": 255}


def _precision(dtype):
    # float32 inputs keep float32 accuracy on tensor cores (3xTF32); 16-bit inputs are exact
    return "tf32x3" if dtype == torch.float32 else "tf32"


class _Problem:
    """Flattened tensors and options of one fused call. ``opts`` are the KernelOptions with the
    logit scales not folded in (s_mul = t_mul = 1 / T, h_mul = 1): the kernels apply
    ``s_scale`` / ``t_scale`` to the logits before the softcap."""

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t, t_logits, labels, opts, V, s_cap, t_cap,
                 s_scale=None, t_scale=None):
        c = lambda x: None if x is None else x.contiguous()  # noqa: E731
        # The interpreter has no bf16 arithmetic (it multiplies raw bit patterns in tl.dot): run
        # it on float32 copies there; compiled kernels read bf16 directly.
        up = (lambda x: None if x is None else x.float()) if interpreting() else c
        self.out_dtypes = (h_s.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)
        self.h_s, self.w_s, self.b_s = up(c(h_s)), up(c(w_s)), up(c(b_s))
        self.h_t, self.w_t, self.b_t = up(c(h_t)), up(c(w_t)), up(c(b_t))
        if t_logits is not None and t_logits.stride(-1) != 1:
            t_logits = t_logits.contiguous()
        self.t_logits = up(t_logits) if t_logits is not None else None
        self.labels = c(labels)
        self.opts, self.V, self.s_cap, self.t_cap = opts, V, s_cap, t_cap
        self.s_scale, self.t_scale = s_scale or 1.0, t_scale or 1.0
        self.N, self.Ds = self.h_s.shape
        self.Vs = self.w_s.shape[0]
        self.Dt = self.h_t.shape[1] if self.h_t is not None else 1
        self.dummy = torch.empty(1, device=self.h_s.device, dtype=self.h_s.dtype)

    def args(self):
        d = self.dummy
        t = self.t_logits
        return (self.h_s, self.w_s, self.b_s if self.b_s is not None else d,
                self.h_t if self.h_t is not None else d, self.w_t if self.w_t is not None else d,
                self.b_t if self.b_t is not None else d, t if t is not None else d)

    def strides(self):
        return (self.h_s.stride(0), self.w_s.stride(0),
                self.h_t.stride(0) if self.h_t is not None else 0,
                self.w_t.stride(0) if self.w_t is not None else 0,
                self.t_logits.stride(0) if self.t_logits is not None else 0)

    def flags(self):
        o = self.opts
        return dict(DIV=o.divergence, HAS_LABELS=self.labels is not None,
                    HARD=self.labels is not None and o.hard_weight != 0.0,
                    SAME_LSE=o.same_lse, HAS_SB=self.b_s is not None,
                    HAS_TB=self.b_t is not None, DENSE_T=self.t_logits is not None,
                    S_CAP=self.s_cap is not None, T_CAP=self.t_cap is not None,
                    PRECISION=_precision(self.h_s.dtype))

    def scalars(self):
        return (self.opts.s_mul, self.s_scale, self.t_scale, self.s_cap or 1.0,
                self.t_cap or 1.0, self.opts.beta)


def stats_splits(N, V, sms, BM, BN):
    """Vocabulary splits of the statistics sweep. The programs resident at one time (about one
    per SM) are sms / splits row blocks x all the splits: per step they read the hidden rows of
    sms / splits row blocks (kept in L2 for the whole sweep) and `splits` weight tiles, fewest
    bytes at splits = sqrt(sms * BM / BN). At least two programs per SM when N is small."""
    best = max(1, round((sms * BM / BN) ** 0.5))
    return max(1, min(triton.cdiv(V, BN), max(best, triton.cdiv(2 * sms, triton.cdiv(N, BM)))))


def split_plan(N, V, sms, BM, BN):
    """(splits, columns per split, a multiple of BN) of the statistics sweep."""
    n = stats_splits(N, V, sms, BM, BN)
    cols = triton.cdiv(triton.cdiv(V, n), BN) * BN
    return triton.cdiv(V, cols), cols


def forward_stats(P: _Problem):
    """Per-row statistics [N, N_ROW] and per-row losses [N] (0 at ignored rows, NaN in rows
    without distributions)."""
    o = P.opts
    dev = P.h_s.device
    BM, BN, BK, warps = _tiles(P.h_s.dtype, "stats")
    n_rb = triton.cdiv(P.N, BM)
    n_splits, cols_per_split = split_plan(P.N, P.V, multiprocessor_count(dev), BM, BN)
    part = torch.empty(P.N, n_splits, N_PART, dtype=torch.float32, device=dev)
    stats = torch.empty(P.N, N_ROW, dtype=torch.float32, device=dev)
    div = torch.empty(P.N, dtype=torch.float32, device=dev)
    labels = P.labels if P.labels is not None else stats
    common = (P.N, P.V, P.Ds, P.Dt) + P.strides() + (cols_per_split, n_splits) + P.scalars()
    fl = P.flags()
    linear_stats_kernel[(n_rb * n_splits,)](*P.args(), labels, stats, part, *common, PASS=1,
                                          BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                          **_launch_options(warps), **fl)
    FB = 64 if not interpreting() else 16
    linear_finish_kernel[(triton.cdiv(P.N, FB),)](part, stats, div, P.N, n_splits, o.beta,
                                                  DIV=fl["DIV"], PASS=1, BLOCK_M=FB)
    if fl["DIV"] not in (0, 1, 6):  # jsd, skew_*, tvd: second sweep for the loss and aux sums
        linear_stats_kernel[(n_rb * n_splits,)](*P.args(), labels, stats, part, *common,
                                                PASS=2,
                                              BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                                              **_launch_options(warps), **fl)
        linear_finish_kernel[(triton.cdiv(P.N, FB),)](part, stats, div, P.N, n_splits, o.beta,
                                                      DIV=fl["DIV"], PASS=2, BLOCK_M=FB)
    rows = o.soft_scale * div
    col = {name: stats[:, i] for i, name in enumerate(ROW_SLOTS)}
    if fl["HARD"]:
        lab = P.labels
        good = (lab >= 0) & (lab < P.V)
        # CE = LSE - z[label] = (m - z[label]) + log d
        ce = (col["m_s"] - col["z_label"]) + col["ld_s"] if fl["SAME_LSE"] else \
            (col["m_1"] - col["z_label"]) + col["ld_1"]
        rows = rows + o.hard_weight * torch.where(good, ce, torch.full_like(ce, float("nan")))
    ok = torch.isfinite(col["ld_s"]) & torch.isfinite(col["ld_t"])
    rows = torch.where(ok, rows, torch.full_like(rows, float("nan")))
    if P.labels is not None:
        rows = torch.where(P.labels != o.ignore_index, rows, torch.zeros_like(rows))
    return stats, rows


# Row blocks per tile group of the gradient kernel: 16 x 64 rows of hidden (Ds + Dt = 8192
# bf16: 17 MB) stay in L2 while the group walks the chunk's columns; the weights are read once
# per group (N / 1024 times per sweep).
GRAD_GROUP_M = 16


def grad_chunk(P: _Problem, stats, rowf, c0, width, out):
    """out [N, width] = gradient w.r.t. the student logits (before scale and softcap) of
    columns [c0, c0 + width)."""
    o = P.opts
    BM, BN, BK, warps = _tiles(P.h_s.dtype)
    labels = P.labels if P.labels is not None else stats
    inv_t, s_scale, t_scale, s_cap, t_cap, beta = P.scalars()
    linear_grad_kernel[(triton.cdiv(P.N, BM) * triton.cdiv(width, BN),)](
        *P.args(), labels, stats, rowf, out, out.stride(0), c0, width,
        P.N, P.V, P.Ds, P.Dt, *P.strides(), inv_t, s_scale, t_scale, s_cap, t_cap, beta,
        o.soft_scale, o.hard_weight, o.ignore_index,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GRAD_GROUP_M,
        **_launch_options(warps), **P.flags())


# ---- GEMM with an accumulating epilogue ------------------------------------------------------------
#
# C [M, N] (op)= A [M, K] @ B [K, N], any strides, float32 accumulation on tensor cores. The
# epilogue either stores the product (OUT_F32: float32 C; else C's own dtype), adds it to a
# float32 C in place, or keeps a float32 accumulator as two 16-bit planes: the high half of the
# float32 bits in a bfloat16 tensor (which, once rounded, is the bfloat16 result itself) and the
# low half in an int16 tensor. The planes hold the float32 value exactly, so a sum over several
# launches equals a float32 accumulation; the last launch rounds it to bfloat16 (round to
# nearest even, as Tensor.to) into the high plane. A bfloat16 grad_weight thus accumulates over
# row chunks in float32 with V x D x 2 bytes of extra memory instead of a V x D float32 buffer.

EPI_STORE = 0       # C = A B, in C's dtype
EPI_ADD = 1         # C += A B, C float32
EPI_SPLIT_FIRST = 2  # (hi, lo) = A B
EPI_SPLIT_ADD = 3    # (hi, lo) += A B
EPI_SPLIT_LAST = 4   # hi = bf16(float32(hi, lo) + A B)


@triton.jit
def _round_bf16_bits(bits):
    """bfloat16 bits (int16) of the float32 with bits `bits`, rounded to nearest even; NaN
    becomes 0x7FC0 (c10's round_to_nearest_even). Integer arithmetic: the same on every target
    and in the interpreter, which has no bfloat16 type."""
    r = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, 0x7FC0, r).to(tl.int16)


@triton.jit(do_not_specialize=["K"])
def mm_kernel(a_ptr, b_ptr, c_ptr, lo_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
              stride_cm, stride_lm, EPI: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of C; tiles in groups of GROUP_M row blocks, so the programs
    running at the same time share their A rows and B columns in L2."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # full K steps without a K mask (K is not specialised: it is the token count of the
    # grad_weight call), then one masked step for the tail
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        kk = k0 + ks
        a = tl.load(a_rows + kk[None, :] * stride_ak, mask=row_in[:, None], other=0.0)
        b = tl.load(b_cols + kk[:, None] * stride_bk, mask=col_in[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if k_full < K:
        kk = k_full + ks
        k_in = kk < K
        a = tl.load(a_rows + kk[None, :] * stride_ak, mask=row_in[:, None] & k_in[None, :],
                    other=0.0)
        b = tl.load(b_cols + kk[:, None] * stride_bk, mask=k_in[:, None] & col_in[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    inb = row_in[:, None] & col_in[None, :]
    c_at = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    if EPI == 0:
        tl.store(c_at, acc.to(c_ptr.dtype.element_ty), mask=inb)
    elif EPI == 1:
        tl.store(c_at, tl.load(c_at, mask=inb, other=0.0) + acc, mask=inb)
    else:
        # c_ptr: the high plane as int16, lo_ptr: the low plane (int16)
        lo_at = lo_ptr + rows[:, None].to(tl.int64) * stride_lm + cols[None, :]
        if EPI != 2:
            hi = tl.load(c_at, mask=inb, other=0).to(tl.int32) << 16
            lo = tl.load(lo_at, mask=inb, other=0).to(tl.int32) & 0xFFFF
            acc += (hi | lo).to(tl.float32, bitcast=True)
        bits = acc.to(tl.int32, bitcast=True)
        if EPI == 4:
            tl.store(c_at, _round_bf16_bits(bits), mask=inb)
        else:
            tl.store(c_at, (bits >> 16).to(tl.int16), mask=inb)
            tl.store(lo_at, bits.to(tl.int16), mask=inb)


def _mm_tiles(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit inputs: 64 x 128 tiles, one warpgroup
    (wgmma m64n128k16 on sm_90), three cp.async stages, about 200 registers: two CTAs per SM, so
    one CTA's epilogue (the accumulator's read-modify-write) overlaps the other's K-loop.
    Tried on sm_90 (triton 3.9): 128 x 128 over two warpgroups, 182 registers, one CTA per SM
    (the epilogue would stall the SM); 128 x 256 and 64 x 256 (m64n256), 255 registers and
    spills."""
    if interpreting():
        return 16, 32, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 64, 128, 64, 4, 3


def mm_into(a, b, c, epi=EPI_STORE, lo=None):
    """c (op)= a @ b with the epilogue `epi` (EPI_*); a [M, K], b [K, N] any strides, c [M, N]
    with unit column stride (for the split epilogues: c the bfloat16 high plane, lo the int16
    low plane of the same shape)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if interpreting():  # no bf16 arithmetic in the interpreter (see _Problem)
        a, b = a.float(), b.float()
    BM, BN, BK, warps, stages = _mm_tiles(a.dtype)
    split = epi >= EPI_SPLIT_FIRST
    c_arg = c.view(torch.int16) if split else c
    lo_arg = lo if split else c
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    opts = {"num_warps": warps} if interpreting() else {"num_warps": warps,
                                                         "num_stages": stages}
    mm_kernel[grid](a, b, c_arg, lo_arg, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                    b.stride(1), c.stride(0), lo_arg.stride(0), EPI=epi,
                    PRECISION=_precision(a.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                    GROUP_M=8, **opts)
    return c
