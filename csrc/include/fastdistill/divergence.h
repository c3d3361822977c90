// The divergences, defined once for the host and the device. Torch-free.
//
// Notation, per row: a_j = s_mul z_s[j], b_j = t_mul z_t[j] (student, teacher: logit scale / T),
// for j < V. lq_j = a_j - LSE(a), lp_j = b_j - LSE(b), q = exp(lq), p = exp(lp).
//
// Every divergence D(P, Q) here has a student gradient of the form
//     dD/da_j = q_j * (h_j - sum_i q_i h_i),   h_j = dD/dq_j (up to an additive constant),
// and dD/dz_s = s_mul dD/da. The kernels therefore make at most three passes over a row:
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
// - mixtures never underflow into log(0): see mix_log.
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

// Per-row statistics after pass 1 (and pass 2). Log-sum-exps are kept as (max, log of the
// shifted sum) so that log-probabilities are formed as (x - m) - ld: with large logits this
// keeps the digits that m + ld followed by x - (m + ld) would round away.
struct RowStats {
  float m_s, ld_s;  // LSE(a) = m_s + ld_s
  float m_t, ld_t;  // LSE(b) = m_t + ld_t
  float m_1, ld_1;  // LSE(h_mul z_s) (hard loss); equal to m_s, ld_s when h_mul == s_mul
  float aux;        // sum_i q_i h_i (reverse / symmetric KL: KL(Q||P), known after pass 1)
};

FD_HD float log_q(float a, const RowStats& r) { return (a - r.m_s) - r.ld_s; }
FD_HD float log_p(float b, const RowStats& r) { return (b - r.m_t) - r.ld_t; }

// A row has both distributions: both shifted sums are positive and finite. False for a NaN or
// +inf logit (the sum is NaN) and for a side whose logits are all -inf (the sum is 0).
FD_HD bool row_ok(float d_s, float d_t) {
  return d_s > 0.0f && d_t > 0.0f && d_s < fd_inf() && d_t < fd_inf();
}

// ---- mixtures (jsd, skew_*) -------------------------------------------------------------------
// M = wp P + wq Q, with log wp, log wq, per call.
struct MixWeights {
  float beta;      // the divergence's beta (jsd's loss weights are beta, 1 - beta)
  float wp, wq;
  float lwp, lwq;  // log wp, log wq (-inf for a zero weight)
};

template <int32_t DIV>
FD_HD MixWeights mix_weights(float beta) {
  using std::log;
  const float wp = DIV == kSkewReverseKL ? 1.0f - beta : beta;
  const float wq = DIV == kSkewReverseKL ? beta : 1.0f - beta;
  return MixWeights{beta, wp, wq, log(wp), log(wq)};
}

// log m for m = wp p + wq q. Where m would be subnormal or 0 although p or q is not (a tiny
// weight times a tiny probability: q = 3e-45 at T = 0.1 made log(beta q) = -inf), the larger
// weighted term alone in the log domain: then one term dominates by many orders of magnitude,
// or both are below 2^-126 and weigh nothing in the loss.
FD_HD float mix_log(float m, float lp, float lq, const MixWeights& w) {
  const float x = lp + w.lwp, y = lq + w.lwq;
  return m >= 1.17549435e-38f ? fd_log(m) : (x > y ? x : y);
}

// p / m or q / m, bounded where m underflows (the product with a tiny q there is negligible)
FD_HD float mix_ratio(float x, float m) {
  return fd_div(x, m > 1.17549435e-38f ? m : 1.17549435e-38f);
}

// ---- pass 2 -----------------------------------------------------------------------------------
// Returns the loss term of element j and adds q_j h_j to `aux`.
template <int32_t DIV>
FD_HD float pass2_term(float lq, float lp, const MixWeights& w, float& aux) {
  const float q = fd_exp(lq), p = fd_exp(lp);
  if constexpr (DIV == kTVD) {
    const float d = q - p;
    const float h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    aux += q * h;
    return 0.5f * (d < 0.0f ? -d : d);
  } else {
    const float m = w.wp * p + w.wq * q;
    const float lm = mix_log(m, lp, lq, w);
    if constexpr (DIV == kJSD) {
      const float tq = q > 0.0f ? q * (lq - lm) : 0.0f;
      aux += (1.0f - w.beta) * tq;
      return (p > 0.0f ? w.beta * p * (lp - lm) : 0.0f) + (1.0f - w.beta) * tq;
    } else if constexpr (DIV == kSkewForwardKL) {
      aux += -w.wq * q * mix_ratio(p, m);
      return p > 0.0f ? p * (lp - lm) : 0.0f;
    } else {  // kSkewReverseKL
      aux += q > 0.0f ? q * (lq - lm - w.wq * mix_ratio(q, m)) : 0.0f;
      return q > 0.0f ? q * (lq - lm) : 0.0f;
    }
  }
}

// ---- pass 3 -----------------------------------------------------------------------------------
// dD/da_j for element j (multiply by s_mul for the gradient w.r.t. the student logit).
template <int32_t DIV>
FD_HD float soft_grad(float lq, float lp, const MixWeights& w, float aux) {
  const float q = fd_exp(lq);
  if constexpr (DIV == kForwardKL) {
    return q - fd_exp(lp);
  } else if constexpr (DIV == kReverseKL) {
    return q > 0.0f ? q * (lq - lp - aux) : 0.0f;
  } else if constexpr (DIV == kSymmetricKL) {
    const float r = w.beta;
    return r * (q - fd_exp(lp)) + (q > 0.0f ? (1.0f - r) * q * (lq - lp - aux) : 0.0f);
  } else if constexpr (DIV == kTVD) {
    const float d = q - fd_exp(lp);
    const float h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    return q * (h - aux);
  } else {
    const float p = fd_exp(lp);
    const float m = w.wp * p + w.wq * q;
    const float lm = mix_log(m, lp, lq, w);
    if constexpr (DIV == kJSD) {
      return q > 0.0f ? q * ((1.0f - w.beta) * (lq - lm) - aux) : 0.0f;
    } else if constexpr (DIV == kSkewForwardKL) {
      return q * (-w.wq * mix_ratio(p, m) - aux);
    } else {  // kSkewReverseKL
      return q > 0.0f ? q * (lq - lm - w.wq * mix_ratio(q, m) - aux) : 0.0f;
    }
  }
}

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
// State of a stream of (a, b) pairs: maxima, shifted sums and the one-pass KL numerators taken
// relative to the running maxima,
//     wf = sum_j e^{b_j - m_t} ((b_j - m_t) - (a_j - m_s))     (forward KL)
//     wr = sum_j e^{a_j - m_s} ((a_j - m_s) - (b_j - m_t))     (reverse KL)
// so that KL(P||Q) = wf / d_t - log d_t + log d_s involves only small numbers (the unshifted
// sum e^{b - m_t} (b - a) loses every digit below ulp(|b|) when logits are large). A numerator
// of +inf (a term whose other side is -inf) absorbs: it stays +inf through every rescale, even
// one that underflows to 0. m = -inf with d = 0 means "nothing finite seen yet". NaN inputs do
// not move the max but turn d into NaN (row_ok then fails).
template <typename Acc>
struct Online {
  float m_s, m_t;
  Acc d_s, d_t, wf, wr;
};

template <typename Acc>
FD_HD Online<Acc> online_empty() {
  return Online<Acc>{-fd_inf(), -fd_inf(), Acc(0), Acc(0), Acc(0), Acc(0)};
}

// exp(m_old - m_new), or 0 when the side has seen nothing.
FD_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -fd_inf() ? 0.0f : fd_exp(m_old - m_new);
}

// A numerator re-expressed relative to the new maxima, times its rescale factor `f`: the
// weighting side `wm` (m_t for wf) moves to `wm_new`, the other side `om` to `om_new`.
// 0 when the weighting side has seen nothing; +inf stays +inf.
template <typename Acc>
FD_HD Acc shift_numerator(Acc w, Acc d, float f, float wm, float wm_new, float om, float om_new) {
  if (wm == -fd_inf()) return Acc(0);
  if (w == Acc(fd_inf())) return w;
  return Acc(f) * (w - Acc((wm_new - wm) - (om_new - om)) * d);
}

// x <- statistics of the union of the two streams (associative; used across chunks on the
// host and across threads on the device).
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

// Element terms of wf / wr for a state whose maxima are (ms, mt): e_t ((b - mt) - (a - ms)) and
// e_s ((a - ms) - (b - mt)); 0 where the weighting side is -inf, +inf where only the other is.
FD_HD float wf_term(float a, float b, float ms, float mt, float e_t) {
  const float v = a == -fd_inf() ? fd_inf() : e_t * ((b - mt) - (a - ms));
  return b == -fd_inf() ? 0.0f : v;
}
FD_HD float wr_term(float a, float b, float ms, float mt, float e_s) {
  const float v = b == -fd_inf() ? fd_inf() : e_s * ((a - ms) - (b - mt));
  return a == -fd_inf() ? 0.0f : v;
}

// KL(P||Q) and KL(Q||P) from the final state.
// (the divisions by shifted sums, which are >= 1 in a usable row)
FD_HD double kl_ratio(double w, double d) { return w / d; }
FD_HD float kl_ratio(float w, float d) { return fd_div(w, d); }

template <typename Acc>
FD_HD Acc online_fkl(const Online<Acc>& x) {
  using std::log;
  return kl_ratio(x.wf, x.d_t) - log(x.d_t) + log(x.d_s);
}
template <typename Acc>
FD_HD Acc online_rkl(const Online<Acc>& x) {
  using std::log;
  return kl_ratio(x.wr, x.d_s) - log(x.d_s) + log(x.d_t);
}

// The divergence known after pass 1 (KL family; 0 for the pass-2 divergences), and the aux of
// its gradient (reverse / symmetric KL: KL(Q||P)).
template <int32_t DIV, typename Acc>
FD_HD Acc pass1_divergence(const Online<Acc>& x, float beta, Acc& rkl) {
  rkl = uses_wr(DIV) ? online_rkl(x) : Acc(0);
  if (DIV == kForwardKL) return online_fkl(x);
  if (DIV == kReverseKL) return rkl;
  if (DIV == kSymmetricKL) return Acc(beta) * online_fkl(x) + Acc(1.0f - beta) * rkl;
  return Acc(0);
}

// Is the row's gradient undefined although its distributions exist? (A reverse-KL term of +inf:
// its gradient q (lq - lp - KL) is inf - inf.)
template <int32_t DIV>
FD_HD bool grad_undefined(float rkl) {
  return uses_wr(DIV) && !(rkl < fd_inf());
}

}  // namespace fastdistill
