"""Sparse (top-k) teachers in Triton: the loss per row and the student gradient in one launch
(fastdistill/topk.py; the contract is topk_forward's in fastdistill/backends/torch_backend.py),
and the fused temperature-softmax + top-k extraction of fastdistill.offline.

Distillation kernel. Persistent programs (a grid of a few per SM) take rows pid, pid + grid, ...;
each owns a slice of a [programs, ceil(V / 32)] int32 bitmask (global memory, L2-resident: V / 8
bytes per program, independent of N). Per row:

  index phase   the K indices set their bits with atomic_or (an index outside [0, V) or a bit
                already set rejects the row: loss NaN, gradient 0, no host synchronisation);
  pass 1        (bucket, none; or a hard loss) the student row in tiles of BLOCK columns, shaped
                [BLOCK / 32, 32] so that one bitmask word covers a row of the tile: the online
                log-sum-exp of a = s_mul z outside the indices (the tail mass is exp(LSE_out -
                LSE), never 1 - sum q), and of h_mul z for a hard loss with its own multiplier;
  K phase       the K gathered logits merged into the full LSE; the bins' loss terms and
                qh = q dD/dq (the formulas of csrc/include/fastdistill/topk.h); the gradient at
                the indices into a [N, K] float32 workspace;
  pass 2        the gradient tiles (one coefficient times exp(a_j - L_ref) outside the indices,
                plus the CE's softmax), a barrier, the K values written over their columns, and
                the row's bits cleared.

HBM traffic per row: 2 reads of the student and 1 write of the gradient (renormalize without a
hard loss: no read outside the indices), O(K) for the teacher and the workspace. Deterministic:
a row's result does not depend on which program runs it.

Extraction kernel: one program per row streams the logits once: the online log-sum-exp of z / T
and a running top-K (K padded to a power of two) of keys that pack the logit's order-preserving
bits with the column (ties to the smaller column); a tile whose maximum cannot enter the running
top-K is skipped without sorting. Output: int32 indices and float32 log-probabilities z / T -
LSE, best first. No [N, V] probability tensor exists.
"""

import torch
import triton
import triton.language as tl

from fastdistill.kernels import interpreting, multiprocessor_count
from fastdistill.kernels.distill import mix_pair

FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
SFKL = tl.constexpr(3)
SRKL = tl.constexpr(4)
TVD = tl.constexpr(5)
SKL = tl.constexpr(6)
FLT_MIN = tl.constexpr(1.17549435e-38)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _bin_terms(lp, lq, beta, DIV: tl.constexpr):
    """(loss term, qh = q dD/dq) of the bins, elementwise (topk.h: bin_terms)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    INF: tl.constexpr = float("inf")
    if (DIV == FKL) or (DIV == RKL) or (DIV == SKL):
        # over the support of the weight (its finite log-probabilities); +inf where the other
        # side is -inf there (divergence.h)
        fkl = tl.where(lp > NEG_INF, tl.where(lq == NEG_INF, INF, p * (lp - lq)), 0.0)
        rkl = tl.where(lq > NEG_INF, tl.where(lp == NEG_INF, INF, q * (lq - lp)), 0.0)
        rqh = tl.where(lq > NEG_INF, tl.where(lp == NEG_INF, INF, q * ((lq - lp) + 1.0)), 0.0)
    if DIV == FKL:
        loss = fkl
        qh = -p
    elif DIV == RKL:
        loss = rkl
        qh = rqh
    elif DIV == SKL:
        loss = beta * fkl + (1.0 - beta) * rkl
        qh = -beta * p + (1.0 - beta) * rqh
    elif DIV == TVD:
        d = q - p
        loss = 0.5 * tl.abs(d)
        qh = q * tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))
    else:
        wp, wq = mix_pair(beta, DIV)
        lwp = tl.where(wp > 0, tl.log(wp), NEG_INF)
        lwq = tl.where(wq > 0, tl.log(wq), NEG_INF)
        m = wp * p + wq * q
        lm = tl.where(m >= FLT_MIN, tl.log(m), tl.maximum(lp + lwp, lq + lwq))
        mc = tl.maximum(m, FLT_MIN)
        if DIV == JSD:
            tq = tl.where(q > 0, q * (lq - lm), 0.0)
            loss = tl.where(p > 0, beta * p * (lp - lm), 0.0) + (1.0 - beta) * tq
            qh = (1.0 - beta) * tq
        elif DIV == SFKL:
            loss = tl.where(p > 0, p * (lp - lm), 0.0)
            qh = -wq * q * (p / mc)
        else:  # SRKL
            loss = tl.where(q > 0, q * (lq - lm), 0.0)
            qh = tl.where(q > 0, q * ((lq - lm) + 1.0 - wq * (q / mc)), 0.0)
    return loss, qh


@triton.jit
def _rescale(m_old, m_new):
    return tl.where(m_old == NEG_INF, 0.0, tl.exp(m_old - m_new))


@triton.jit
def _lse_add(m, d, x):
    """Online log-sum-exp (max, shifted sum) after the values of the tile x (-inf: nothing;
    NaN reaches the sum)."""
    cm = tl.max(x)
    cd = tl.sum(tl.where(x == NEG_INF, 0.0, tl.exp(x - cm)))
    mn = tl.maximum(m, cm)
    return mn, _rescale(m, mn) * d + _rescale(cm, mn) * cd


@triton.jit
def _lse_ok(m, d):
    return (m > NEG_INF) & (m < float("inf")) & (d > 0) & (d < float("inf"))


@triton.jit
def topk_distill_kernel(
    s_ptr, s_stride, i_ptr, i_stride, l_ptr, l_stride, labels_ptr, g_ptr, g_stride,
    loss_ptr, scale_ptr, work_ptr, bits_ptr,
    N, V, G_WIDTH, K, WORDS, ignore_index, beta, s_mul, h_mul, soft_scale, hard_weight,
    DIV: tl.constexpr, TAIL: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
    SAME_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    BR: tl.constexpr = BLOCK // 32
    rr = tl.arange(0, BR)
    cc = tl.arange(0, 32)
    offs = rr[:, None] * 32 + cc[None, :]
    koffs = tl.arange(0, KBLOCK)
    bits_row = bits_ptr + pid.to(tl.int64) * WORDS
    NAN: tl.constexpr = float("nan")
    INF: tl.constexpr = float("inf")
    zero = tl.zeros([], dtype=tl.float32)
    for row in range(pid, N, nprog):
        r64 = row + tl.zeros([], dtype=tl.int64)
        s_row = s_ptr + r64 * s_stride
        i_row = i_ptr + r64 * i_stride
        l_row = l_ptr + r64 * l_stride
        g_row = g_ptr + r64 * g_stride
        w_row = work_ptr + r64 * K

        label = 0
        valid = True
        usable = True
        if HAS_LABELS:
            label = tl.load(labels_ptr + r64)
            valid = label != ignore_index
            usable = valid
            if HARD:
                usable = valid & (label >= 0) & (label < V)
        # ---- index phase: the row's bits, range and repetition checks ----
        nbad = tl.zeros([], dtype=tl.int32)
        if usable:
            for k0 in range(0, K, KBLOCK):
                ks = k0 + koffs
                km = ks < K
                idx = tl.load(i_row + ks, mask=km, other=0)
                inr = (idx >= 0) & (idx < V)
                sidx = tl.where(inr, idx, 0).to(tl.int32)
                bit = tl.full([KBLOCK], 1, tl.int32) << (sidx & 31)
                old = tl.atomic_or(bits_row + (sidx >> 5), bit, mask=km & inr)
                rep = (old & bit) != 0
                nbad += tl.sum(tl.where(km & ((inr == 0) | rep), 1, 0))
            tl.debug_barrier()
        if usable & (nbad == 0):
            # ---- pass 1: LSE of a outside the indices (and of h z) ----
            m_o = zero + NEG_INF
            d_o = zero
            m_1 = zero + NEG_INF
            d_1 = zero
            if (TAIL != 2) or HARD:
                for j0 in range(0, V, BLOCK):
                    cols = j0 + offs
                    inb = cols < V
                    z = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                    wi = j0 // 32 + rr
                    word = tl.load(bits_row + wi, mask=wi < WORDS, other=0)
                    member = ((word[:, None] >> cc[None, :]) & 1) != 0
                    m_o, d_o = _lse_add(m_o, d_o, tl.where(member, NEG_INF, z * s_mul))
                    if HARD and not SAME_LSE:
                        m_1, d_1 = _lse_add(m_1, d_1, z * h_mul)
            # ---- K phase: LSE of the K logits and of the logprobs, the teacher's mass ----
            m_i = zero + NEG_INF
            d_i = zero
            m_l = zero + NEG_INF
            d_l = zero
            s_p = zero
            t_bad = tl.zeros([], dtype=tl.int32)
            for k0 in range(0, K, KBLOCK):
                ks = k0 + koffs
                km = ks < K
                idx = tl.load(i_row + ks, mask=km, other=0)
                a_k = tl.load(s_row + idx, mask=km, other=NEG_INF).to(tl.float32) * s_mul
                lp = tl.load(l_row + ks, mask=km, other=NEG_INF).to(tl.float32)
                m_i, d_i = _lse_add(m_i, d_i, a_k)
                m_l, d_l = _lse_add(m_l, d_l, lp)
                s_p += tl.sum(tl.where(km, tl.exp(lp), 0.0))
                t_bad += tl.sum(tl.where(km & ((lp != lp) | (lp == INF)), 1, 0))
            # the full LSE of a: (m, ld)
            m = tl.maximum(m_o, m_i)
            d = _rescale(m_o, m) * d_o + _rescale(m_i, m) * d_i
            ok = _lse_ok(m, d)
            m = tl.where(ok, m, 0.0)
            ld = tl.log(d)
            if TAIL == 2:
                lq_off = m_i
                lq_ld = tl.log(d_i)
                lp_off = m_l
                lp_ld = tl.log(d_l)
                ok_r = _lse_ok(m_i, d_i) & _lse_ok(m_l, d_l)
                if HARD:
                    ok = ok & ok_r
                else:
                    ok = ok_r
            else:
                lq_off = m
                lq_ld = ld
                lp_off = zero
                lp_ld = zero
            ok = ok & (t_bad == 0)
            lq_tail = tl.where(d_o > 0, (m_o - m) + (tl.log(d_o) - ld), NEG_INF)
            p_tail = 1.0 - s_p
            lp_tail = tl.where(p_tail > 0, tl.log(tl.maximum(p_tail, FLT_MIN)), NEG_INF)
            # ---- loss and aux over the bins ----
            acc_l = tl.zeros([KBLOCK], dtype=tl.float32)
            acc_a = tl.zeros([KBLOCK], dtype=tl.float32)
            for k0 in range(0, K, KBLOCK):
                ks = k0 + koffs
                km = ks < K
                idx = tl.load(i_row + ks, mask=km, other=0)
                a_k = tl.load(s_row + idx, mask=km, other=0.0).to(tl.float32) * s_mul
                lp = tl.load(l_row + ks, mask=km, other=0.0).to(tl.float32)
                lterm, qh = _bin_terms((lp - lp_off) - lp_ld, (a_k - lq_off) - lq_ld, beta, DIV)
                acc_l += tl.where(km, lterm, 0.0)
                acc_a += tl.where(km, qh, 0.0)
            div = tl.sum(acc_l)
            aux = tl.sum(acc_a)
            qh_tail = zero
            if TAIL == 0:
                l_tail, qh_tail = _bin_terms(lp_tail, lq_tail, beta, DIV)
                div += l_tail
                aux += qh_tail
            m1 = m
            ld1 = ld
            if HARD and not SAME_LSE:
                m1 = m_1
                ld1 = tl.log(d_1)
                ok = ok & _lse_ok(m_1, d_1)
            loss = soft_scale * div
            if HARD:
                z_label = tl.load(s_row + label).to(tl.float32) * h_mul
                loss += hard_weight * ((m1 - z_label) + ld1)
            tl.store(loss_ptr + r64, tl.where(ok, loss, NAN))

            if WRITE_GRAD:
                nan_row = (ok == 0) | (((aux > NEG_INF) & (aux < INF)) == 0)
                gs = tl.load(scale_ptr)
                cs = gs * soft_scale * s_mul
                ch = gs * hard_weight * h_mul
                # ---- the gradient at the indices, into the workspace ----
                for k0 in range(0, K, KBLOCK):
                    ks = k0 + koffs
                    km = ks < K
                    idx = tl.load(i_row + ks, mask=km, other=0)
                    zk = tl.load(s_row + idx, mask=km, other=0.0).to(tl.float32)
                    lq = (zk * s_mul - lq_off) - lq_ld
                    lp = tl.load(l_row + ks, mask=km, other=0.0).to(tl.float32)
                    _unused, qk = _bin_terms((lp - lp_off) - lp_ld, lq, beta, DIV)
                    g = cs * (qk - aux * tl.exp(lq))
                    if HARD:
                        g += ch * (tl.exp((zk * h_mul - m1) - ld1) - tl.where(idx == label, 1.0,
                                                                                0.0))
                    tl.store(w_row + ks, tl.where(nan_row, NAN, g), mask=km)
                # grad may be the student: the K logits and the label's logit are read by now
                tl.debug_barrier()
                # ---- pass 2: C exp(a_j - (m_ref + ld_ref)) outside (+ the CE's softmax) ----
                if TAIL == 0:
                    some = d_o > 0
                    qt = tl.exp(lq_tail)
                    c = cs * (qh_tail - aux * qt)
                    if HARD and SAME_LSE:
                        c += ch * qt
                    c = tl.where(some, c, 0.0)
                    m_ref = tl.where(some, m_o, 0.0)
                    ld_ref = tl.where(some, tl.log(tl.where(some, d_o, 1.0)), 0.0)
                elif TAIL == 1:
                    c = -cs * aux
                    if HARD and SAME_LSE:
                        c += ch
                    m_ref = m
                    ld_ref = ld
                else:
                    c = zero
                    if HARD and SAME_LSE:
                        c += ch
                    m_ref = m
                    ld_ref = ld
                fin = (m_ref + ld_ref > NEG_INF) & (m_ref + ld_ref < INF)
                m_ref = tl.where(fin, m_ref, 0.0)
                ld_ref = tl.where(fin, ld_ref, 0.0)
                reads = (c != 0) | nan_row
                if HARD and not SAME_LSE:
                    reads = zero == zero
                for j0 in range(0, G_WIDTH, BLOCK):
                    cols = j0 + offs
                    inb = cols < V
                    z = tl.full([BR, 32], NEG_INF, tl.float32)
                    if (TAIL != 2) or HARD:  # renormalize: nothing outside depends on z
                        if reads:
                            z = tl.load(s_row + cols, mask=inb, other=NEG_INF).to(tl.float32)
                    g = tl.where(c != 0, c * tl.exp((z * s_mul - m_ref) - ld_ref), 0.0)
                    if HARD:
                        if not SAME_LSE:
                            g += ch * tl.exp((z * h_mul - m1) - ld1)
                        g -= tl.where(cols == label, ch, 0.0)
                    g = tl.where(nan_row, NAN, g)
                    g = tl.where(inb, g, 0.0)
                    tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < G_WIDTH)
                tl.debug_barrier()  # every column written before the K values go over theirs
                for k0 in range(0, K, KBLOCK):
                    ks = k0 + koffs
                    km = ks < K
                    idx = tl.load(i_row + ks, mask=km, other=0)
                    g = tl.load(w_row + ks, mask=km, other=0.0)
                    tl.store(g_row + idx, g.to(g_ptr.dtype.element_ty), mask=km)
        else:
            # ignored row: 0; a rejected row (indices, or the hard loss's label): NaN; either way
            # a zero gradient
            tl.store(loss_ptr + r64, tl.where(valid, NAN, 0.0))
            if WRITE_GRAD:
                zg = tl.zeros([BR, 32], dtype=g_ptr.dtype.element_ty)
                for j0 in range(0, G_WIDTH, BLOCK):
                    cols = j0 + offs
                    tl.store(g_row + cols, zg, mask=cols < G_WIDTH)
        # ---- the row's bits back to 0 ----
        if usable:
            for k0 in range(0, K, KBLOCK):
                ks = k0 + koffs
                km = ks < K
                idx = tl.load(i_row + ks, mask=km, other=0)
                inr = (idx >= 0) & (idx < V)
                sidx = tl.where(inr, idx, 0).to(tl.int32)
                tl.store(bits_row + (sidx >> 5), tl.zeros([KBLOCK], dtype=tl.int32),
                         mask=km & inr)
            tl.debug_barrier()


# persistent programs per multiprocessor (the grid), and the cap on K per inner step
PROGRAMS_PER_SM = 4


def block_size(width: int) -> int:
    """Vocabulary tile: a power of two in [64, 2048] (64 under the interpreter)."""
    cap = 64 if interpreting() else 2048
    return max(64 if not interpreting() else 32, min(triton.next_power_of_2(max(width, 1)), cap))


def k_block(k: int) -> int:
    cap = 32 if interpreting() else 256
    return max(16, min(triton.next_power_of_2(max(k, 1)), cap))


def launch_options(block: int) -> dict:
    warps = 8 if block >= 2048 else 4
    return {"num_warps": warps} if interpreting() else {"num_warps": warps, "maxnreg": 128}


def topk_forward(student, indices, logprobs, labels, opts, tail, vocab, grad_scale, need_grad,
                 grad_out=None):
    """Launcher with the contract of fastdistill.backends.torch_backend.topk_forward."""
    N, Vs = student.shape
    K = indices.shape[1]
    if tail == 0 and K >= vocab:
        tail = 1  # nothing lies outside the indices: no tail bin
    dev = student.device
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else student.new_empty(student.shape)
    if N == 0:
        return rows, grad
    if labels is not None:
        labels = labels.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    logprobs = logprobs if logprobs.stride(-1) == 1 else logprobs.contiguous()
    programs = max(1, min(N, multiprocessor_count(dev) * PROGRAMS_PER_SM))
    words = (vocab + 31) // 32
    bits = torch.zeros(programs, words, dtype=torch.int32, device=dev)
    work = torch.empty(N, K, dtype=torch.float32, device=dev) if need_grad else rows
    block = block_size(Vs)
    topk_distill_kernel[(programs,)](
        student, student.stride(0), indices, indices.stride(0), logprobs, logprobs.stride(0),
        labels if labels is not None else rows,
        grad if grad is not None else rows, grad.stride(0) if grad is not None else 0,
        rows, grad_scale, work, bits,
        N, vocab, Vs, K, words, opts.ignore_index, opts.beta, opts.s_mul, opts.h_mul,
        opts.soft_scale, opts.hard_weight,
        DIV=opts.divergence, TAIL=tail, HAS_LABELS=labels is not None,
        HARD=labels is not None and opts.hard_weight != 0.0, SAME_LSE=opts.same_lse,
        WRITE_GRAD=grad is not None, BLOCK=block, KBLOCK=k_block(K), **launch_options(block),
    )
    return rows, grad


# ---- extraction: fused temperature softmax + top-k -----------------------------------------------

@triton.jit
def _order_key(x, cols):
    """int64 keys ordered as (x, -column): the float's bits made order-preserving as a signed
    int32 in the high word, 2^32 - 1 - column in the low word."""
    u = x.to(tl.int32, bitcast=True)
    o = u ^ ((u >> 31) & 0x7FFFFFFF)
    lowbits = 4294967295 - cols.to(tl.int64)
    return (o.to(tl.int64) << 32) | lowbits


@triton.jit
def topk_extract_kernel(z_ptr, z_stride, idx_ptr, lp_ptr, V, K, inv_t,
                        BLOCK: tl.constexpr, KP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    offs = tl.arange(0, BLOCK)
    low: tl.constexpr = -9223372036854775807 - 1
    run = tl.full([KP], low, tl.int64)
    thr = tl.min(run)
    m = tl.zeros([], dtype=tl.float32) + NEG_INF
    d = tl.zeros([], dtype=tl.float32)
    for j0 in range(0, V, BLOCK):
        cols = j0 + offs
        inb = cols < V
        x = tl.load(z_row + cols, mask=inb, other=NEG_INF).to(tl.float32) * inv_t
        m, d = _lse_add(m, d, x)
        key = tl.where(inb, _order_key(x, cols), low)
        if tl.max(key) > thr:  # this tile can enter the running top-K
            both = tl.cat(run, tl.topk(key, KP))
            run = tl.topk(both, KP)
            thr = tl.min(run)
    lse = m + tl.log(d)
    o = (run >> 32).to(tl.int32)
    x = (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    col = 4294967295 - (run & 4294967295)
    ks = tl.arange(0, KP)
    tl.store(idx_ptr + row * K + ks, col.to(tl.int32), mask=ks < K)
    tl.store(lp_ptr + row * K + ks, x - lse, mask=ks < K)


def extract_topk_rows(logits, k: int, temperature: float):
    """(indices [N, k] int32, logprobs [N, k] float32) of softmax(logits / temperature) per row,
    best first (ties: the smaller index first), for 2-D ``logits [N, V]`` with unit stride along
    V; one read of the logits, no probability tensor."""
    N, V = logits.shape
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}] (the vocabulary), got {k}")
    kp = triton.next_power_of_2(k)
    idx = torch.empty(N, k, dtype=torch.int32, device=logits.device)
    lp = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    if N == 0:
        return idx, lp
    # 16 bytes of logits per thread and tile (8 warps): 2048 16-bit or 1024 float32 columns
    cap = 64 if interpreting() else 4096 // logits.element_size()
    block = max(kp, min(triton.next_power_of_2(V), cap), 16)
    opts = {"num_warps": 8 if block >= 1024 else 4}
    topk_extract_kernel[(N,)](logits, logits.stride(0), idx, lp, V, k, 1.0 / temperature,
                              BLOCK=block, KP=kp, **opts)
    return idx, lp
