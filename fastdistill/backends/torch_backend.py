"""Pure-PyTorch backend: runs on any device, the fallback of every other backend.

It computes the same loss and student gradient as the fused kernels, in float32, chunk by chunk
over rows, so it never holds more than one chunk of ``[rows, V]`` float32 temporaries; the
gradient is produced in the forward pass (no autograd graph over ``[N, V]``).

Backend contract (every ``*_backend`` module)::

    distill_forward(student [N, Vs], teacher [N, Vt], labels [N] int64 | None,
                    opts: KernelOptions, vocab: int, grad_scale: 0-d float32 tensor,
                    need_grad: bool, grad_out: [N, Vs] | None)
        -> (loss_rows [N] float32, grad [N, Vs] in the student dtype | None)

    loss_rows[r] = soft_scale * D(P_r, Q_r) + hard_weight * CE_r, 0 where labels == ignore_index
    grad[r]      = grad_scale * d loss_rows[r] / d student[r]  (0 in columns >= vocab)

``grad_out`` (optional) is the buffer to write the gradient into; it may be ``student`` itself.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastdistill.config import FEATURE_KINDS, KernelOptions
from fastdistill.divergences import FKL, JSD, RKL, SFKL, SKL, SRKL, TVD

# float32 elements per [rows, V] temporary; about ten of them live at once.
CHUNK_ELEMENTS = 1 << 21


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def _rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, keepdim=True)


def _plogr(w, lw, lm):
    """sum w (lw - lm) over the support of w (its finite log-weights, whether or not w
    underflows in float32), +inf where lm is -inf there: the rules of divergence.h."""
    keep = lw > -math.inf
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    term = torch.where(keep, w * (torch.where(keep, lw, zero) - torch.where(keep, lm, zero)),
                       zero)
    term = torch.where(keep & (lm == -math.inf) & (w == 0), math.inf, term)
    return term.sum(-1)


def _soft_rows(a: torch.Tensor, b: torch.Tensor, code: int, beta: float):
    """(divergence per row, dD/da, rows that are usable, rows whose gradient is defined) for
    scaled logits a (student), b (teacher): [R, V] float32. A row is usable when both
    log-sum-exps are finite (no NaN, no +inf, not all -inf); an infinite reverse KL has no
    gradient (the rules of csrc/include/fastdistill/divergence.h)."""
    # log-probabilities as (x - max) - log(sum e^(x - max)), as the kernels form them: the
    # shifted logit is exact where the probability matters, and no rounded LSE of size |x| is
    # subtracted from it
    u, v = a - a.amax(-1, keepdim=True), b - b.amax(-1, keepdim=True)
    ld_s = torch.log(torch.exp(u).sum(-1, keepdim=True))
    ld_t = torch.log(torch.exp(v).sum(-1, keepdim=True))
    # usable rows: both log-sum-exps finite (not NaN / +inf / all -inf)
    ok = (torch.isfinite(ld_s) & torch.isfinite(ld_t) & torch.isfinite(a.amax(-1, keepdim=True))
          & torch.isfinite(b.amax(-1, keepdim=True))).squeeze(-1)
    lq, lp = u - ld_s, v - ld_t
    q, p = lq.exp(), lp.exp()
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    if code == FKL:
        return _plogr(p, lp, lq), q - p, ok, ok
    if code in (RKL, SKL):
        # In the shifted form of the kernels (divergence.h): with u = a - max a, v = b - max b,
        # lq - lp - KL(Q||P) = (u - v) - W, W = sum q (u - v); fewer roundings of large logits.
        x = torch.where(q > 0, u - v, zero)
        w = (q * x).sum(-1, keepdim=True)
        rkl = _plogr(q, lq, lp)
        g = torch.where(q > 0, q * (x - w), zero)
        ok_grad = ok & torch.isfinite(rkl)
        if code == RKL:
            return rkl, g, ok, ok_grad
        r = beta
        return r * _plogr(p, lp, lq) + (1 - r) * rkl, r * (q - p) + (1 - r) * g, ok, ok_grad
    if code == JSD:
        lm = torch.logaddexp(lp + _log_weight(beta), lq + _log_weight(1 - beta))
        div = beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
        h = torch.where(q > 0, (1 - beta) * (lq - lm), zero)
    elif code == SFKL:
        lm = torch.logaddexp(lp + _log_weight(beta), lq + _log_weight(1 - beta))
        div = _plogr(p, lp, lm)
        h = torch.where(p > 0, -(1 - beta) * torch.exp(torch.where(p > 0, lp - lm, zero)), zero)
    elif code == SRKL:
        lm = torch.logaddexp(lp + _log_weight(1 - beta), lq + _log_weight(beta))
        div = _plogr(q, lq, lm)
        safe = torch.where(q > 0, lq - lm, zero)
        h = torch.where(q > 0, safe - beta * torch.exp(safe), zero)
    elif code == TVD:
        div = 0.5 * (p - q).abs().sum(-1)
        h = 0.5 * torch.sign(q - p)
    else:
        raise ValueError(f"unknown divergence code {code}")
    aux = _rowsum(q * h)
    return div, torch.where(q > 0, q * (h - aux), zero), ok, ok


def distill_forward(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                    opts: KernelOptions, vocab: int, grad_scale: torch.Tensor, need_grad: bool,
                    grad_out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, Vs = student.shape
    V = vocab
    code, beta = opts.divergence, opts.beta
    soft_scale, hw = opts.soft_scale, opts.hard_weight
    hard = hw != 0.0 and labels is not None
    rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else student.new_empty(student.shape)
        if Vs > V:
            grad[:, V:].zero_()
    nan = torch.full((), math.nan, dtype=torch.float32, device=student.device)
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = student[r0:r1, :V].float()
        div, g, ok, ok_grad = _soft_rows(z * opts.s_mul,
                                         teacher[r0:r1, :V].float() * opts.t_mul, code, beta)
        loss = soft_scale * div
        if need_grad:
            g = g * (soft_scale * opts.s_mul)
        valid = None
        if labels is not None:
            lab = labels[r0:r1]
            valid = lab != opts.ignore_index
            if hard:
                safe = torch.where(valid, lab, torch.zeros_like(lab)).clamp(0, V - 1)
                l1 = torch.log_softmax(z * opts.h_mul, -1)
                ce = -l1.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
                # a label outside [0, V) gives a NaN loss and a zero gradient for its row, as
                # the kernels do (the API rejects such labels first on CPU)
                bad = valid & ((lab < 0) | (lab >= V))
                ce = torch.where(bad, nan, ce)
                loss = loss + hw * ce
                if need_grad:
                    onehot = torch.zeros_like(l1).scatter_(-1, safe.unsqueeze(-1), 1.0)
                    g = g + (hw * opts.h_mul) * (l1.exp() - onehot)
        loss = torch.where(ok, loss, nan)
        if valid is not None:
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        rows[r0:r1] = loss
        if need_grad:
            g = torch.where((ok & ok_grad).unsqueeze(-1), g * grad_scale, nan)
            if valid is not None:
                keep = valid & ~bad if hard else valid
                g = torch.where(keep.unsqueeze(-1), g, torch.zeros_like(g))
            grad[r0:r1, :V] = g.to(grad.dtype)
    return rows, grad


# ----------------------------------------------------------------------------------------------
# feature losses
# ----------------------------------------------------------------------------------------------

COSINE_EPS = 1e-8
LAYER_NORM_EPS = 1e-5
# feature kind codes: the positions in fastdistill.config.FEATURE_KINDS
MSE, COSINE, NORMALIZED_MSE = (FEATURE_KINDS.index(k) for k in ("mse", "cosine",
                                                                 "normalized_mse"))


def feature_rows(s: torch.Tensor, t: torch.Tensor, kind: int):
    """Per-row feature loss and dL/ds for float32 rows [R, D]."""
    D = s.shape[-1]
    if kind == MSE:
        d = s - t
        return (d * d).mean(-1), d * (2.0 / D)
    if kind == COSINE:
        ns, nt = s.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
        ns_c, nt_c = ns.clamp_min(COSINE_EPS), nt.clamp_min(COSINE_EPS)
        cos = _rowsum(s * t) / (ns_c * nt_c)
        cs = torch.where(ns > COSINE_EPS, cos / (ns_c * ns_c), torch.zeros_like(cos))
        return (1.0 - cos).squeeze(-1), cs * s - t / (ns_c * nt_c)
    if kind == NORMALIZED_MSE:
        ms, mt = s.mean(-1, keepdim=True), t.mean(-1, keepdim=True)
        sc, tc = s - ms, t - mt
        vs = (sc * sc).mean(-1, keepdim=True) + LAYER_NORM_EPS
        vt = (tc * tc).mean(-1, keepdim=True) + LAYER_NORM_EPS
        sh, th = sc * vs.rsqrt(), tc * vt.rsqrt()
        d = sh - th
        loss = (d * d).mean(-1)
        md = _rowsum(d * sh) * (2.0 / D / D)
        return loss, (d * (2.0 / D) - sh * md) * vs.rsqrt()
    raise ValueError(f"unknown feature kind {kind}")


def feature_forward(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor],
                    kind: int, grad_scale: torch.Tensor, need_grad: bool
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Feature loss per row ``[N]`` (0 where mask is False) and ``grad_scale * dL_r/ds_r``."""
    N, D = student.shape
    rows = torch.empty(N, dtype=torch.float32, device=student.device)
    grad = student.new_empty(student.shape) if need_grad else None
    step = max(1, CHUNK_ELEMENTS // max(D, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        loss, g = feature_rows(student[r0:r1].float(), teacher[r0:r1].float(), kind)
        # a NaN in a row makes its whole gradient NaN, as in the kernels (RELIABILITY.md)
        g = torch.where(torch.isnan(loss).unsqueeze(-1), torch.full_like(g, math.nan), g)
        if mask is not None:
            m = mask[r0:r1]
            loss = torch.where(m, loss, torch.zeros_like(loss))
            g = torch.where(m.unsqueeze(-1), g, torch.zeros_like(g))
        rows[r0:r1] = loss
        if need_grad:
            grad[r0:r1] = (g * grad_scale).to(grad.dtype)
    return rows, grad


# ----------------------------------------------------------------------------------------------
# sparse (top-k) teachers
# ----------------------------------------------------------------------------------------------
#
# Contract of every backend's topk_forward (fastdistill/topk.py calls it):
#
#     topk_forward(student [N, Vs], indices [N, K] int32 | int64, logprobs [N, K] float32 |
#                  float16 | bfloat16, labels [N] int64 | None, opts: KernelOptions, tail: int,
#                  vocab: int, grad_scale: 0-d float32 tensor, need_grad: bool,
#                  grad_out: [N, Vs] | None)
#         -> (loss_rows [N] float32, grad [N, Vs] in the student dtype | None)
#
#     loss_rows[r] = soft_scale * D_tail(P_r, Q_r) + hard_weight * CE_r (fastdistill.reference:
#                    reference_topk_distill_loss; opts.t_mul is not used: the logprobs are
#                    taken as given); 0 where labels == ignore_index
#     grad[r]      = grad_scale * d loss_rows[r] / d student[r]  (0 in columns >= vocab)
#     tail         = fastdistill.config.TOPK_TAILS.index(topk_tail): 0 bucket, 1 none,
#                    2 renormalize; bucket with K >= vocab has no tail bin (it is "none")
#     a row that counts with an index outside [0, vocab) or a repeated index: loss NaN,
#                    gradient 0 (no host synchronisation; the API rejects such rows on CPU)
#
# ``grad_out`` may be ``student`` itself (the linear loss computes the gradient in place).

TAIL_BUCKET, TAIL_NONE, TAIL_RENORMALIZE = range(3)
FLT_MIN = 1.17549435e-38


def topk_bin_terms(lp: torch.Tensor, lq: torch.Tensor, code: int, beta: float):
    """(loss term, qh = q * dD/dq) per bin, float32, for teacher / student log-probabilities
    of the bins (the per-element formulas of csrc/include/fastdistill/topk.h)."""
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)

    inf = torch.full((), math.inf, dtype=lp.dtype, device=lp.device)

    # the KL terms over the support of their weight (its finite log-probabilities, whether or
    # not the probability underflows), +inf where the other side is -inf there
    def fkl():
        return torch.where(lp > -math.inf, torch.where(lq == -math.inf, inf, p * (lp - lq)),
                           zero), -p

    def rkl():
        on = lq > -math.inf
        return (torch.where(on, torch.where(lp == -math.inf, inf, q * (lq - lp)), zero),
                torch.where(on, torch.where(lp == -math.inf, inf, q * (lq - lp + 1)), zero))

    if code == FKL:
        return fkl()
    if code == RKL:
        return rkl()
    if code == SKL:
        (lf, hf), (lr, hr) = fkl(), rkl()
        return beta * lf + (1 - beta) * lr, beta * hf + (1 - beta) * hr
    if code == TVD:
        d = q - p
        return 0.5 * d.abs(), q * 0.5 * torch.sign(d)
    wp, wq = (1 - beta, beta) if code == SRKL else (beta, 1 - beta)
    m = wp * p + wq * q
    lm = torch.where(m >= FLT_MIN, torch.log(m),
                     torch.maximum(lp + _log_weight(wp), lq + _log_weight(wq)))
    mc = m.clamp_min(FLT_MIN)
    if code == JSD:
        tq = torch.where(q > 0, q * (lq - lm), zero)
        return torch.where(p > 0, beta * p * (lp - lm), zero) + (1 - beta) * tq, (1 - beta) * tq
    if code == SFKL:
        return torch.where(p > 0, p * (lp - lm), zero), -wq * q * (p / mc)
    if code == SRKL:
        return (torch.where(q > 0, q * (lq - lm), zero),
                torch.where(q > 0, q * (lq - lm + 1 - wq * (q / mc)), zero))
    raise ValueError(f"unknown divergence code {code}")


def _lse_parts(x: torch.Tensor):
    """(max, log of the shifted sum) over the last dim, keepdim; (-inf, -inf) for a row with
    nothing finite (NaN propagates into the sum)."""
    m = x.amax(-1, keepdim=True)
    ms = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ld = torch.log(torch.where(x == -math.inf, torch.zeros_like(x), torch.exp(x - ms)).sum(-1,
                                                                                      keepdim=True))
    return torch.where(m == -math.inf, m, ms), ld


def topk_bad_rows(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R] bool: an index outside [0, vocab) or a repeated index in the row."""
    out = ((idx < 0) | (idx >= vocab)).any(-1)
    if idx.shape[1] > 1:
        out |= (idx.sort(-1).values.diff(dim=-1) == 0).any(-1)
    return out


def topk_forward(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                 labels: Optional[torch.Tensor], opts: KernelOptions, tail: int, vocab: int,
                 grad_scale: torch.Tensor, need_grad: bool,
                 grad_out: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    N, Vs = student.shape
    K, V = indices.shape[1], vocab
    code, beta = opts.divergence, opts.beta
    if tail == TAIL_BUCKET and K >= V:
        tail = TAIL_NONE
    hard = opts.hard_weight != 0.0 and labels is not None
    dev = student.device
    rows = torch.empty(N, dtype=torch.float32, device=dev)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else student.new_empty(student.shape)
        if Vs > V:
            grad[:, V:].zero_()
    nan = torch.full((), math.nan, dtype=torch.float32, device=dev)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = student[r0:r1, :V].float()
        a = z * opts.s_mul
        idx = indices[r0:r1].to(torch.int64)
        lp = logprobs[r0:r1].float()
        bad = topk_bad_rows(idx, V)
        sidx = idx.clamp(0, V - 1)
        a_k = a.gather(1, sidx)
        member = torch.zeros_like(a, dtype=torch.bool).scatter_(1, sidx, True)
        # ---- the student's log-probabilities of the bins
        m_in, ld_in = _lse_parts(a_k)
        if tail == TAIL_RENORMALIZE:
            lq = (a_k - m_in) - ld_in
            m_t, ld_t = _lse_parts(lp)
            lpb = (lp - m_t) - ld_t
            ok = torch.isfinite(m_in + ld_in) & (m_t > -math.inf)
            lqb = lq
            m_f, ld_f = None, None
        else:
            m_o, ld_o = _lse_parts(torch.where(member, -math.inf, a))
            m_f = torch.maximum(m_o, m_in)
            ms = torch.where(torch.isfinite(m_f), m_f, torch.zeros_like(m_f))
            ld_f = torch.log(torch.exp(m_o + ld_o - ms) + torch.exp(m_in + ld_in - ms))
            ok = torch.isfinite(m_f + ld_f)
            lq = (a_k - m_f) - ld_f
            lqb, lpb = lq, lp
            if tail == TAIL_BUCKET:
                lq_out = (m_o - m_f) + (ld_o - ld_f)
                p_out = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)
                lqb = torch.cat([lq, lq_out], 1)
                lpb = torch.cat([lp, torch.log(p_out)], 1)
        ok = ok.squeeze(-1) & ~(torch.isnan(lp) | (lp == math.inf)).any(-1)
        terms, qh = topk_bin_terms(lpb, lqb, code, beta)
        div, aux = terms.sum(-1), qh.sum(-1, keepdim=True)
        loss = opts.soft_scale * div
        valid = None
        if labels is not None:
            lab = labels[r0:r1]
            valid = lab != opts.ignore_index
        if hard:
            safe = torch.where(valid, lab, torch.zeros_like(lab)).clamp(0, V - 1)
            l1 = torch.log_softmax(z * opts.h_mul, -1)
            ce = -l1.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            badlab = valid & ((lab < 0) | (lab >= V))
            loss = loss + opts.hard_weight * torch.where(badlab, nan, ce)
            ok = ok & torch.isfinite(torch.logsumexp(z * opts.h_mul, -1))
            bad = bad | badlab
        loss = torch.where(ok, loss, nan)
        loss = torch.where(bad, nan, loss)
        if valid is not None:
            loss = torch.where(valid, loss, zero)
        rows[r0:r1] = loss
        if not need_grad:
            continue
        cs = opts.soft_scale * opts.s_mul
        if tail == TAIL_RENORMALIZE:
            g = torch.zeros_like(a)
            g_k = qh - aux * lq.exp()
        else:
            q = torch.exp((a - m_f) - ld_f)
            if tail == TAIL_BUCKET:
                r_out = torch.where(a == -math.inf, zero, torch.exp((a - m_o) - ld_o))
                g = qh[:, -1:] * r_out - aux * q
                g_k = qh[:, :-1] - aux * lq.exp()
            else:
                g = -aux * q
                g_k = qh - aux * lq.exp()
        g = (g.scatter(1, sidx, g_k)) * cs
        if hard:
            onehot = torch.zeros_like(l1).scatter_(-1, safe.unsqueeze(-1), 1.0)
            g = g + (opts.hard_weight * opts.h_mul) * (l1.exp() - onehot)
        nan_row = ~ok | ~torch.isfinite(aux.squeeze(-1))
        g = torch.where(nan_row.unsqueeze(-1), nan, g * grad_scale)
        keep = ~bad if valid is None else valid & ~bad
        g = torch.where(keep.unsqueeze(-1), g, zero)
        grad[r0:r1, :V] = g.to(grad.dtype)
    return rows, grad
