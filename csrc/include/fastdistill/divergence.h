// The divergences, defined once for the host and the device. Torch-free.
//
// Notation, per row: a_j = z_s[j] / T, b_j = z_t[j] / T (student, teacher), for j < V.
// lq_j = a_j - LSE(a), lp_j = b_j - LSE(b), q = exp(lq), p = exp(lp).
//
// Every divergence D(P, Q) here has a student gradient of the form
//     dD/da_j = q_j * (h_j - sum_i q_i h_i),   h_j = dD/dq_j (up to an additive constant),
// and dD/dz_s = dD/da / T. The kernels therefore make at most three passes over a row:
//   pass 1: online log-sum-exps (and the whole divergence for forward / reverse KL),
//   pass 2: the loss and aux = sum_i q_i h_i (jsd, skew_*, tvd only),
//   pass 3: the gradient.
// Forward KL uses its closed form q - p (no division by q).
//
//   forward_kl       KL(P||Q)                           grad q - p
//   reverse_kl       KL(Q||P)                           h = lq - lp, aux = KL(Q||P)
//   jsd              b KL(P||M) + (1-b) KL(Q||M),       h = (1-b)(lq - lm), M = bP + (1-b)Q
//   skew_forward_kl  KL(P||M), M = bP + (1-b)Q          h = -(1-b) p / m
//   skew_reverse_kl  KL(Q||M), M = (1-b)P + bQ          h = lq - lm - b q / m
//   tvd              1/2 sum |p - q|                    h = 1/2 sign(q - p)   (0 where p == q)
//
// Terms with a zero probability contribute 0 (0 log 0 = 0), so -inf logits are exact.
// beta = 0 for jsd / skew_* and beta = 1 for jsd are mapped to forward / reverse KL by the
// callers (fastdistill/divergences.py), so the formulas below never see those endpoints where
// they would divide by a zero mixture.
#pragma once

#include <cmath>
#include <cstdint>

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
};

// Does the divergence need pass 2 (a row sum that depends on both log-sum-exps)?
FD_HD bool needs_pass2(int32_t div) { return div >= kJSD; }

// Options of one call, identical for every row (an aggregate: build it with braces, in this
// field order).
struct DistillParams {
  int32_t divergence;
  float beta;
  float inv_temperature;
  float soft_scale;    // soft_weight * (T^2 if t2_scale else 1)
  float hard_weight;   // weight of CE(student logits at T = 1, label)
  int64_t ignore_index;
  int64_t vocab;       // V: columns [0, V) are real; student columns [V, width) get zero gradient
};

// Per-row statistics after pass 1 (and pass 2). Log-sum-exps are kept as (max, log of the
// shifted sum) so that log-probabilities are formed as (x - m) - ld: with large logits this
// keeps the digits that m + ld followed by x - (m + ld) would round away.
struct RowStats {
  float m_s, ld_s;  // LSE(a) = m_s + ld_s
  float m_t, ld_t;  // LSE(b) = m_t + ld_t
  float m_1, ld_1;  // LSE(z_s) at T = 1 (hard loss); equal to m_s, ld_s when T == 1
  float aux;        // sum_i q_i h_i (reverse KL: KL(Q||P), known after pass 1)
};

FD_HD float log_q(float a, const RowStats& r) { return (a - r.m_s) - r.ld_s; }
FD_HD float log_p(float b, const RowStats& r) { return (b - r.m_t) - r.ld_t; }

// ---- pass 2 -----------------------------------------------------------------------------------
// Returns the loss term of element j and adds q_j h_j to `aux`.
template <int32_t DIV>
FD_HD float pass2_term(float lq, float lp, float beta, float& aux) {
  const float q = fd_exp(lq), p = fd_exp(lp);
  if constexpr (DIV == kJSD) {
    const float lm = fd_log(beta * p + (1.0f - beta) * q);
    const float h = (1.0f - beta) * (lq - lm);
    aux += q > 0.0f ? q * h : 0.0f;
    return (p > 0.0f ? beta * p * (lp - lm) : 0.0f) + (q > 0.0f ? (1.0f - beta) * q * (lq - lm) : 0.0f);
  } else if constexpr (DIV == kSkewForwardKL) {
    const float m = beta * p + (1.0f - beta) * q;
    const float lm = fd_log(m);
    aux += m > 0.0f ? -(1.0f - beta) * q * p / m : 0.0f;
    return p > 0.0f ? p * (lp - lm) : 0.0f;
  } else if constexpr (DIV == kSkewReverseKL) {
    const float m = (1.0f - beta) * p + beta * q;
    const float lm = fd_log(m);
    aux += q > 0.0f ? q * (lq - lm - beta * q / m) : 0.0f;
    return q > 0.0f ? q * (lq - lm) : 0.0f;
  } else {  // kTVD
    const float d = q - p;
    const float h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    aux += q * h;
    return 0.5f * (d < 0.0f ? -d : d);
  }
}

// ---- pass 3 -----------------------------------------------------------------------------------
// dD/da_j for element j (multiply by 1/T for the gradient w.r.t. the student logit).
template <int32_t DIV>
FD_HD float soft_grad(float lq, float lp, float beta, float aux) {
  const float q = fd_exp(lq);
  if constexpr (DIV == kForwardKL) {
    return q - fd_exp(lp);
  } else if constexpr (DIV == kReverseKL) {
    return q > 0.0f ? q * (lq - lp - aux) : 0.0f;
  } else if constexpr (DIV == kJSD) {
    const float p = fd_exp(lp);
    const float lm = fd_log(beta * p + (1.0f - beta) * q);
    return q > 0.0f ? q * ((1.0f - beta) * (lq - lm) - aux) : 0.0f;
  } else if constexpr (DIV == kSkewForwardKL) {
    const float p = fd_exp(lp);
    const float m = beta * p + (1.0f - beta) * q;
    const float h = m > 0.0f ? -(1.0f - beta) * p / m : 0.0f;
    return q * (h - aux);
  } else if constexpr (DIV == kSkewReverseKL) {
    const float p = fd_exp(lp);
    const float m = (1.0f - beta) * p + beta * q;
    return q > 0.0f ? q * (lq - fd_log(m) - beta * q / m - aux) : 0.0f;
  } else {  // kTVD
    const float d = q - fd_exp(lp);
    const float h = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
    return q * (h - aux);
  }
}

// Calls f(std::integral_constant-like tag) with the divergence as a compile-time constant:
// one switch per row (host) or per block (device), never per element.
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
    default: f(DivTag<kTVD>{}); break;
  }
}

// ---- pass 1: online statistics ----------------------------------------------------------------
// State of a stream of (a, b) pairs: maxima, shifted sums and, for forward KL, the one-pass
// numerator taken relative to the running maxima,
//     w = sum_j e^{b_j - m_t} ((b_j - m_t) - (a_j - m_s)),
// so that KL(P||Q) = w / d_t - log d_t + log d_s involves only small numbers (the unshifted
// sum e^{b - m_t} (b - a) loses every digit below ulp(|b|) when logits are large). Reverse KL
// keeps the mirror image (roles of a and b swapped). m = -inf with d = 0 means "nothing finite
// seen yet"; NaN inputs do not move the max (fmax) but turn d into NaN, which propagates.
template <typename Acc>
struct Online {
  float m_s, m_t;
  Acc d_s, d_t, w;
};

template <typename Acc>
FD_HD Online<Acc> online_empty() {
  return Online<Acc>{-fd_inf(), -fd_inf(), Acc(0), Acc(0), Acc(0)};
}

// exp(m_old - m_new), or 0 when the side has seen nothing.
FD_HD float rescale_factor(float m_old, float m_new) {
  return m_old == -fd_inf() ? 0.0f : fd_exp(m_old - m_new);
}

// w of `x` re-expressed relative to the new maxima (ms, mt), before the d rescale factor.
template <int32_t DIV, typename Acc>
FD_HD Acc shifted_w(const Online<Acc>& x, float ms, float mt) {
  if (DIV == kForwardKL) {
    return x.m_t == -fd_inf() ? Acc(0) : x.w - Acc((mt - x.m_t) - (ms - x.m_s)) * x.d_t;
  } else {
    return x.m_s == -fd_inf() ? Acc(0) : x.w - Acc((ms - x.m_s) - (mt - x.m_t)) * x.d_s;
  }
}

// x <- statistics of the union of the two streams (associative; used across chunks on the
// host and across threads on the device).
template <int32_t DIV, typename Acc>
FD_HD void online_merge(Online<Acc>& x, const Online<Acc>& y) {
  const float ms = x.m_s > y.m_s ? x.m_s : y.m_s;
  const float mt = x.m_t > y.m_t ? x.m_t : y.m_t;
  const Acc xs = rescale_factor(x.m_s, ms), ys = rescale_factor(y.m_s, ms);
  const Acc xt = rescale_factor(x.m_t, mt), yt = rescale_factor(y.m_t, mt);
  if (DIV == kForwardKL) {
    x.w = xt * shifted_w<DIV>(x, ms, mt) + yt * shifted_w<DIV>(y, ms, mt);
  } else if (DIV == kReverseKL) {
    x.w = xs * shifted_w<DIV>(x, ms, mt) + ys * shifted_w<DIV>(y, ms, mt);
  }
  x.d_s = xs * x.d_s + ys * y.d_s;
  x.d_t = xt * x.d_t + yt * y.d_t;
  x.m_s = ms;
  x.m_t = mt;
}

// Element term of w for a state whose maxima are (ms, mt): forward KL e_t ((b - mt) - (a - ms)),
// reverse KL e_s ((a - ms) - (b - mt)); 0 where the weighting probability is 0, +inf where the
// other side is -inf.
template <int32_t DIV>
FD_HD float w_term(float a, float b, float ms, float mt, float e_s, float e_t) {
  if (DIV == kForwardKL) {
    const float v = a == -fd_inf() ? fd_inf() : e_t * ((b - mt) - (a - ms));
    return b == -fd_inf() ? 0.0f : v;
  } else {
    const float v = b == -fd_inf() ? fd_inf() : e_s * ((a - ms) - (b - mt));
    return a == -fd_inf() ? 0.0f : v;
  }
}

// Divergence of pass 1 (forward / reverse KL) from the final state.
template <int32_t DIV, typename Acc>
FD_HD Acc online_kl(const Online<Acc>& x) {
  using std::log;
  if (DIV == kForwardKL) return x.w / x.d_t - log(x.d_t) + log(x.d_s);
  return x.w / x.d_s - log(x.d_s) + log(x.d_t);
}

}  // namespace fastdistill
