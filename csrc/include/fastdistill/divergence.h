// The divergences, defined once for the host and the device. Torch-free.
//
// Notation, per row: a_j = s_mul z_s[j], b_j = t_mul z_t[j] (student, teacher: logit scale / T),
// for j < V. lq_j = a_j - LSE(a), lp_j = b_j - LSE(b), q = exp(lq), p = exp(lp).
//
// The kernels work in the log2 domain: the logit multipliers carry log2(e) (k_s = s_mul log2 e,
// k_t = t_mul log2 e), the row's statistics are kept relative to a shift m_s (the maximum of
// k_s z_s, rounded once), and a log2-probability is lq2 = fma(z_s, k_s, -m_s) - l_s with
// l_s = log2 sum 2^(k_s z_s - m_s): the fused multiply-add forms k_s z_s - m_s exactly and rounds
// once, a small number near the maximum (m_s is a number like any other: every pass subtracts the
// same one), and q = 2^lq2 is one MUFU.EX2 on the device (fast_math.h). Sums of log-ratio terms
// are taken in log2 units and multiplied by ln 2 once per row.
//
// Every divergence D(P, Q) here has a student gradient of the form
//     dD/da_j = q_j * (h_j - sum_i q_i h_i),   h_j = dD/dq_j (up to an additive constant),
// and dD/dz_s = s_mul dD/da. The kernels therefore make at most three passes over a row (the
// CUDA kernels on sm_90 hold the row in shared memory and read HBM once):
//   pass 1: online log-sum-exps (and the whole divergence for the KL family),
//   pass 2: the loss and aux = sum_i q_i h_i (jsd, skew_*, tvd only),
//   pass 3: the gradient.
//
//   forward_kl       KL(P||Q)                           grad q - p (closed form)
//   reverse_kl       KL(Q||P)                           h = lq - lp, aux = KL(Q||P)
//   jsd              b KL(P||M) + (1-b) KL(Q||M),       h = (1-b)(lq - lm), M = bP + (1-b)Q
//   skew_forward_kl  KL(P||M), M = bP + (1-b)Q          h = -(1-b) p / m
//   skew_reverse_kl  KL(Q||M), M = (1-b)P + bQ          h = lq - lm - b q / m
//   tvd              1/2 sum |p - q|                    h = 1/2 sign(q - p)   (0 where p == q)
//   symmetric_kl     r KL(P||Q) + (1-r) KL(Q||P)        r (q - p) + (1-r) q (lq - lp - KL(Q||P))
//
// Special values (the same on every backend; fastdistill/reference.py is the oracle):
// - terms with a zero probability contribute 0 (0 log 0 = 0), so -inf logits are exact; the
//   support of P is the set of columns with a finite teacher logit;
// - KL(P||Q) is +inf when P has mass where Q has none (KL(Q||P) likewise); forward KL keeps its
//   finite gradient q - p, while a reverse-KL term that is +inf makes the row's gradient NaN
//   (it is undefined; float64 autograd of the reference gives NaN too);
// - a row with a NaN, a +inf, or only -inf logits on either side (no distribution) has a NaN
//   loss and a NaN gradient: row_ok() below is false for it;
// - mixtures never underflow into log(0): see mix_log2.
// beta = 0 for jsd / skew_*, beta = 1 for jsd and ratio in {0, 1} are mapped to forward /
// reverse KL by the callers (fastdistill/divergences.py: kernel_code), so the formulas below never
// see an empty mixture weight.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdistill/args.h"
#include "fastdistill/config.h"
#include "fastdistill/fast_math.h"

namespace fastdistill {

// Same numbering as fastdistill/divergences.py (DIVERGENCE_CODES).
enum Divergence : int32_t {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kSymmetricKL = 6,
};

// Does the divergence need pass 2 (a row sum that depends on both log-sum-exps)?
FD_HD constexpr bool needs_pass2(int32_t div) { return div >= kJSD && div <= kTVD; }
// Does pass 1 carry the forward / reverse KL numerator?
FD_HD constexpr bool uses_wf(int32_t div) { return div == kForwardKL || div == kSymmetricKL; }
FD_HD constexpr bool uses_wr(int32_t div) { return div == kReverseKL || div == kSymmetricKL; }

// The row's statistics after pass 1 (and aux after pass 2): shifts (maxima of the scaled
// logits) and log2 of the shifted sums, so that lq2_j = fma(z_s[j], k_s, -m_s) - l_s (log2_prob).
struct RowStats {
  float m_s, l_s;  // student: max k_s z_s, log2 sum 2^(k_s z_s - m_s)
  float m_t, l_t;  // teacher
  float m_1, l_1;  // hard loss: the shift and log2 sum of k_h z_s; m_s, l_s when h_mul == s_mul
  float aux;       // sum_i q_i h_i in natural units (reverse / symmetric KL: KL(Q||P) / ln 2)
};

FD_HD float log2_prob(float z, float m, float k, float l) { return fd_fma(z, k, -m) - l; }

// A row has both distributions: both shifted sums are positive and finite. False for a NaN or
// +inf logit (the sum is NaN) and for a side whose logits are all -inf (the sum is 0).
FD_HD bool row_ok(float d_s, float d_t) {
  return d_s > 0.0f && d_t > 0.0f && d_s < fd_inf() && d_t < fd_inf();
}

// ---- mixtures (jsd, skew_*) -------------------------------------------------------------------
// M = wp P + wq Q, with log2 wp, log2 wq, per call.
struct MixWeights {
  float beta;        // the divergence's beta (jsd's loss weights are beta, 1 - beta)
  float wp, wq;
  float lwp2, lwq2;  // log2 wp, log2 wq
};

template <int32_t DIV>
inline MixWeights mix_weights(float beta) {
  const float wp = DIV == kSkewReverseKL ? 1.0f - beta : beta;
  const float wq = DIV == kSkewReverseKL ? beta : 1.0f - beta;
  return MixWeights{beta, wp, wq, std::log2(wp), std::log2(wq)};
}

// log2 m for m = wp p + wq q, never -inf while p or q is not 0: log2 m is at least the log of
// its larger term, max(lp2 + log2 wp, lq2 + log2 wq), and that term in the log domain is used
// where m underflows (a tiny weight times a tiny probability: q = 3e-45 at T = 0.1 made
// log(beta q) = -inf) or is subnormal (fd_log2 flushes it to -inf). Where m is normal the max
// changes log2 m by at most its rounding.
FD_HD float mix_log2(float m, float lp2, float lq2, const MixWeights& w) {
  const float x = lp2 + w.lwp2, y = lq2 + w.lwq2;
  const float l = fd_log2(m);
#if FD_DEVICE_CODE
  return fmaxf(l, fmaxf(x, y));  // FMNMX (NaN only reaches rows that are NaN anyway)
#else
  const float t = x > y ? x : y;
  return l > t ? l : t;
#endif
}

// Loss terms come out in log2 units for the log divergences (times ln 2 per row), plain for tvd.
template <int32_t DIV>
FD_HD constexpr float loss_unit() {
  return DIV == kTVD ? 1.0f : kLn2;
}

// ---- pass 2 -----------------------------------------------------------------------------------
// Element j of pass 2 from its log2-probabilities: returns the loss term (in the unit of
// loss_unit) and sets qh = q_j h_j (natural units) and h = h_j.
template <int32_t DIV>
FD_HD float pass2_elem(float lq2, float lp2, const MixWeights& w, float& qh, float& h) {
  const float q = fd_exp2(lq2), p = fd_exp2(lp2);
  if constexpr (DIV == kTVD) {
    const float d = q - p;
    h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    qh = q * h;
    return 0.5f * (d < 0.0f ? -d : d);
  } else {
    const float m = w.wp * p + w.wq * q;
    const float lm2 = mix_log2(m, lp2, lq2, w);
    // h is set to 0 where q = 0, so that q (h - aux) is 0 there (h of a -inf logit is -inf or NaN)
    if constexpr (DIV == kJSD) {
      const float tq = q > 0.0f ? q * (lq2 - lm2) : 0.0f;
      h = q > 0.0f ? (1.0f - w.beta) * kLn2 * (lq2 - lm2) : 0.0f;
      qh = (1.0f - w.beta) * kLn2 * tq;
      return (p > 0.0f ? w.beta * p * (lp2 - lm2) : 0.0f) + (1.0f - w.beta) * tq;
    } else if constexpr (DIV == kSkewForwardKL) {
      h = p > 0.0f ? -w.wq * fd_exp2(lp2 - lm2) : 0.0f;  // -wq p / m
      qh = q * h;
      return p > 0.0f ? p * (lp2 - lm2) : 0.0f;
    } else {  // kSkewReverseKL
      h = q > 0.0f ? kLn2 * (lq2 - lm2) - w.wq * fd_exp2(lq2 - lm2) : 0.0f;  // lq - lm - wq q / m
      qh = q * h;
      return q > 0.0f ? q * (lq2 - lm2) : 0.0f;
    }
  }
}

// ---- pass 3 -----------------------------------------------------------------------------------
// dD/da_j for element j (multiply by s_mul for the gradient w.r.t. the student logit), from its
// log2-probabilities and the row's aux (reverse / symmetric KL: KL(Q||P) / ln 2, log2 units).
template <int32_t DIV>
FD_HD float soft_grad(float lq2, float lp2, const MixWeights& w, float aux) {
  const float q = fd_exp2(lq2);
  if constexpr (DIV == kForwardKL) {
    return q - fd_exp2(lp2);
  } else if constexpr (DIV == kReverseKL) {
    return q > 0.0f ? kLn2 * q * (lq2 - lp2 - aux) : 0.0f;
  } else if constexpr (DIV == kSymmetricKL) {
    const float r = w.beta;
    return r * (q - fd_exp2(lp2)) + (q > 0.0f ? (1.0f - r) * kLn2 * q * (lq2 - lp2 - aux) : 0.0f);
  } else if constexpr (DIV == kTVD) {
    const float d = q - fd_exp2(lp2);
    const float h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    return q * (h - aux);
  } else {
    float qh, h;
    pass2_elem<DIV>(lq2, lp2, w, qh, h);
    return q * (h - aux);
  }
}

// The gradient from a stored h_j (pass 2 kept it): q (h - aux).
FD_HD float grad_from_h(float q, float h, float aux) { return q * (h - aux); }

// Calls f(DivTag<D>{}) with the divergence as a compile-time constant: one switch per row (host)
// or per block (device), never per element.
template <int32_t D>
struct DivTag {
  static constexpr int32_t value = D;
};

template <typename F>
FD_HD void dispatch_divergence(int32_t div, F&& f) {
  switch (div) {
    case kForwardKL: f(DivTag<kForwardKL>{}); break;
    case kReverseKL: f(DivTag<kReverseKL>{}); break;
    case kJSD: f(DivTag<kJSD>{}); break;
    case kSkewForwardKL: f(DivTag<kSkewForwardKL>{}); break;
    case kSkewReverseKL: f(DivTag<kSkewReverseKL>{}); break;
    case kSymmetricKL: f(DivTag<kSymmetricKL>{}); break;
    default: f(DivTag<kTVD>{}); break;
  }
}

// ---- pass 1: online statistics ----------------------------------------------------------------
// State of a stream of (z_s, z_t) pairs: shifts m (maxima of the scaled logits k z), shifted sums
// in the log2 domain and the one-pass KL numerators taken relative to the running shifts (log2
// units, u = k z - m, formed by one fused multiply-add),
//     d_s = sum_j 2^{u_s},   wf = sum_j 2^{u_t} (u_t - u_s)   (forward KL),
//     d_t = sum_j 2^{u_t},   wr = sum_j 2^{u_s} (u_s - u_t)   (reverse KL),
// so that KL(P||Q) = ln 2 (wf / d_t - log2 d_t + log2 d_s) involves only small numbers (the
// unshifted sum 2^{u_t} (b - a) loses every digit below ulp(|z|) when logits are large). A
// numerator of +inf (a term whose other side is -inf) absorbs: it stays +inf through every
// rescale, even one that underflows to 0. m = -inf with d = 0 means "nothing finite seen yet".
// NaN inputs do not move the max but turn d into NaN (row_ok then fails). The multipliers are
// positive, so max(k z) = k max(z): the kernels take maxima of the raw logits and scale them.
template <typename Acc>
struct Online {
  float m_s, m_t;
  Acc d_s, d_t, wf, wr;
};

template <typename Acc>
FD_HD Online<Acc> online_empty() {
  return Online<Acc>{-fd_inf(), -fd_inf(), Acc(0), Acc(0), Acc(0), Acc(0)};
}

// 2^(m_old - m_new), or 0 when the side has seen nothing.
FD_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -fd_inf() ? 0.0f : fd_exp2(m_old - m_new);
}

// A shift usable in an exponent: -inf (nothing finite seen) becomes -FLT_MAX, so that
// fma(z, k, -m) is -inf, not NaN, for z = -inf.
FD_HD float finite_shift(float m) { return m > -3.40282347e38f ? m : -3.40282347e38f; }

// A numerator re-expressed relative to the new shifts, times its rescale factor `f`: the
// weighting side `wm` (m_t for wf) moves to `wm_new`, the other side `om` to `om_new`.
// 0 when the weighting side has seen nothing; +inf stays +inf.
template <typename Acc>
FD_HD Acc shift_numerator(Acc w, Acc d, float f, float wm, float wm_new, float om, float om_new) {
  if (wm == -fd_inf()) return Acc(0);
  if (w == Acc(fd_inf())) return w;
  return Acc(f) * (w - Acc((wm_new - wm) - (om_new - om)) * d);
}

// x <- statistics of the union of the two streams (associative; used across chunks on the
// host and across threads and blocks on the device).
template <int32_t DIV, typename Acc>
FD_HD void online_merge(Online<Acc>& x, const Online<Acc>& y) {
  const float ms = x.m_s > y.m_s ? x.m_s : y.m_s;
  const float mt = x.m_t > y.m_t ? x.m_t : y.m_t;
  const float xs = rescale_factor(x.m_s, ms), ys = rescale_factor(y.m_s, ms);
  const float xt = rescale_factor(x.m_t, mt), yt = rescale_factor(y.m_t, mt);
  if (uses_wf(DIV))
    x.wf = shift_numerator(x.wf, x.d_t, xt, x.m_t, mt, x.m_s, ms) +
           shift_numerator(y.wf, y.d_t, yt, y.m_t, mt, y.m_s, ms);
  if (uses_wr(DIV))
    x.wr = shift_numerator(x.wr, x.d_s, xs, x.m_s, ms, x.m_t, mt) +
           shift_numerator(y.wr, y.d_s, ys, y.m_s, ms, y.m_t, mt);
  x.d_s = Acc(xs) * x.d_s + Acc(ys) * y.d_s;
  x.d_t = Acc(xt) * x.d_t + Acc(yt) * y.d_t;
  x.m_s = ms;
  x.m_t = mt;
}

// Element terms of wf / wr from the shifted values u_s, u_t and the exponential of the weighting
// side: e_t (u_t - u_s) and e_s (u_s - u_t); 0 where the weighting side is -inf, +inf where only
// the other is.
FD_HD float wf_term(float u_s, float u_t, float e_t) {
  const float v = u_s == -fd_inf() ? fd_inf() : e_t * (u_t - u_s);
  return u_t == -fd_inf() ? 0.0f : v;
}
FD_HD float wr_term(float u_s, float u_t, float e_s) {
  const float v = u_t == -fd_inf() ? fd_inf() : e_s * (u_s - u_t);
  return u_s == -fd_inf() ? 0.0f : v;
}

// KL(P||Q) / ln 2 and KL(Q||P) / ln 2 from the final state.
// (the divisions by shifted sums, which are >= 1 in a usable row)
FD_HD double kl_ratio(double w, double d) { return w / d; }
FD_HD float kl_ratio(float w, float d) { return fd_div(w, d); }
FD_HD double acc_log2(double x) { return std::log2(x); }
FD_HD float acc_log2(float x) { return fd_log2(x); }

template <typename Acc>
FD_HD Acc online_fkl2(const Online<Acc>& x) {
  return kl_ratio(x.wf, x.d_t) - acc_log2(x.d_t) + acc_log2(x.d_s);
}
template <typename Acc>
FD_HD Acc online_rkl2(const Online<Acc>& x) {
  return kl_ratio(x.wr, x.d_s) - acc_log2(x.d_s) + acc_log2(x.d_t);
}

// The divergence known after pass 1 (KL family, natural units; 0 for the pass-2 divergences),
// and KL(Q||P) / ln 2 (reverse / symmetric KL: the aux of their gradients, in log2 units).
template <int32_t DIV, typename Acc>
FD_HD Acc pass1_divergence(const Online<Acc>& x, float beta, Acc& rkl2) {
  rkl2 = uses_wr(DIV) ? online_rkl2(x) : Acc(0);
  if (DIV == kForwardKL) return Acc(kLn2) * online_fkl2(x);
  if (DIV == kReverseKL) return Acc(kLn2) * rkl2;
  if (DIV == kSymmetricKL)
    return Acc(kLn2) * (Acc(beta) * online_fkl2(x) + Acc(1.0f - beta) * rkl2);
  return Acc(0);
}

// Is the row's gradient undefined although its distributions exist? (A reverse-KL term of +inf:
// its gradient q (lq - lp - KL) is inf - inf.)
template <int32_t DIV>
FD_HD bool grad_undefined(float rkl2) {
  return uses_wr(DIV) && !(rkl2 < fd_inf());
}

}  // namespace fastdistill
