// Sparse (top-k) teachers: the per-bin math shared by the host and device kernels. Torch-free.
//
// A row's teacher is K (index, log-probability) pairs; the loss compares bins (fastdistill/
// reference.py: reference_topk_distill_loss, where the formulas and gradients are written out):
//   bucket       K + 1 bins: the K indices and the tail (the mass outside them),
//   none         the K indices only, student probabilities from the full softmax,
//   renormalize  the K indices, both sides renormalised over them.
// Per bin b with teacher / student log-probabilities (lp, lq) this header gives the bin's loss
// term and qh = q dD/dq, the exact partial derivative of the bin's term times q (exact, not up
// to a constant: the K bins of "none" do not sum to 1). The gradient w.r.t. a_j is then
//     member j = index k:  qh_k - aux q_j,      outside:  qh_tail (q_j / Q_tail) - aux q_j,
// with aux = sum_b qh_b (qh_tail = 0 for "none"; renormalize: members only, q the renormalised
// probabilities).
//
// The formulas are the element terms of csrc/include/fastdistill/divergence.h (the dense
// kernels), with the same special-value rules: 0 log 0 = 0 (a logprob of -inf is a teacher
// probability of 0), the support of a side is its finite log-probabilities, a KL term is +inf
// where P's support meets Q's -inf (forward KL keeps its finite gradient -p), a mixture's log
// never underflows to log(0) (the larger weighted term in the log domain, as mix_log there),
// and an infinite reverse-KL term makes aux infinite: the kernels then write a NaN gradient.
// They are kept here, small and local, rather than shared with the dense kernels' internals.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdistill/config.h"
#include "fastdistill/fast_math.h"

namespace fastdistill {
namespace topk {

// divergence codes of fastdistill/divergences.py
constexpr int32_t kFKL = 0, kRKL = 1, kJSD = 2, kSFKL = 3, kSRKL = 4, kTVD = 5, kSKL = 6;
constexpr float kFltMin = 1.17549435e-38f;

// exp / log in the accumulation type: the device's fast intrinsics for float, libm for double
// (the host's K-phase runs in double)
FD_HD float t_exp(float x) { return fd_exp(x); }
FD_HD float t_log(float x) { return fd_log(x); }
inline double t_exp(double x) { return std::exp(x); }
inline double t_log(double x) { return std::log(x); }
// a / b for b in [FLT_MIN, 2^126] (fd_div: no IEEE slow path on the device)
FD_HD float t_div(float a, float b) { return fd_div(a, b); }
inline double t_div(double a, double b) { return a / b; }

template <typename T>
FD_HD T t_inf() {
  return T(fd_inf());
}

// log(wp p + wq q) with m = wp p + wq q given; where m underflows below FLT_MIN (or is 0
// although a side is not), the larger weighted term in the log domain.
template <typename T>
FD_HD T mix_log(T m, T lp, T lq, T lwp, T lwq) {
  const T x = lp + lwp, y = lq + lwq;
  return m >= T(kFltMin) ? t_log(m) : (x > y ? x : y);
}

// The loss term of one bin and qh = q dD/dq, for teacher / student log-probabilities lp, lq.
template <typename T>
FD_HD void bin_terms(int32_t div, T beta, T lp, T lq, T& loss, T& qh) {
  const T p = t_exp(lp), q = t_exp(lq);
  const T zero = T(0), one = T(1), inf = t_inf<T>();
  // the KL terms over the support of their weight: its finite log-probabilities, whether or
  // not the probability underflows; +inf where the other side is -inf there (divergence.h)
  const T fkl = lp > -inf ? (lq == -inf ? inf : p * (lp - lq)) : zero;
  const T rkl = lq > -inf ? (lp == -inf ? inf : q * (lq - lp)) : zero;
  const T rkl_qh = lq > -inf ? (lp == -inf ? inf : q * ((lq - lp) + one)) : zero;
  switch (div) {
    case kFKL:
      loss = fkl;
      qh = -p;
      return;
    case kRKL:
      loss = rkl;
      qh = rkl_qh;
      return;
    case kSKL:
      loss = beta * fkl + (one - beta) * rkl;
      qh = -beta * p + (one - beta) * rkl_qh;
      return;
    case kTVD: {
      const T d = q - p;
      loss = T(0.5) * (d < zero ? -d : d);
      qh = q * (d > zero ? T(0.5) : (d < zero ? T(-0.5) : zero));
      return;
    }
    default: break;
  }
  // mixtures: M = wp P + wq Q (skew_reverse_kl weighs them the other way round)
  const T wp = div == kSRKL ? one - beta : beta;
  const T wq = div == kSRKL ? beta : one - beta;
  const T lwp = wp > zero ? t_log(wp) : -t_inf<T>();
  const T lwq = wq > zero ? t_log(wq) : -t_inf<T>();
  const T m = wp * p + wq * q;
  const T lm = mix_log(m, lp, lq, lwp, lwq);
  const T mc = m > T(kFltMin) ? m : T(kFltMin);
  if (div == kJSD) {
    const T tq = q > zero ? q * (lq - lm) : zero;
    loss = (p > zero ? beta * p * (lp - lm) : zero) + (one - beta) * tq;
    qh = (one - beta) * tq;
  } else if (div == kSFKL) {
    loss = p > zero ? p * (lp - lm) : zero;
    qh = -wq * q * t_div(p, mc);
  } else {  // kSRKL
    loss = q > zero ? q * (lq - lm) : zero;
    qh = q > zero ? q * ((lq - lm) + one - wq * t_div(q, mc)) : zero;
  }
}

}  // namespace topk
}  // namespace fastdistill
