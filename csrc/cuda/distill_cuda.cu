// Logit-level distillation loss and student gradient on the GPU: the contract of
// csrc/cpu/distill_cpu.cpp (cpu::distill_rows), with the per-element math of
// csrc/include/fastdistill/divergence.h (log2 domain) shared with it; only the data movement,
// the fast paths and the reductions live here. Two kernels:
//
// distill_kernel (the default; "resident"): the row stays in shared memory, HBM is read once.
//   A row is split into C contiguous slices (C = 1, 2, 4, 8 or 16 CTAs: a thread-block cluster
//   on sm_90; C = 1 on sm_80, for rows that fit one CTA), chosen by the launcher (plan_resident)
//   from the row's bytes and the shared memory per block. Each CTA copies its slice of s and t
//   into shared memory with cp.async, eight units per thread in flight (a pipeline of constant
//   depth, no registers held), computes per-thread running statistics as the copies land,
//   reduces them once per CTA (the maxima, then plain sums), and the CTAs of the cluster
//   exchange their states through distributed shared memory (every CTA merges the C states in
//   the same order: the same bits everywhere). The later passes read shared memory: pass 2 of
//   jsd / skew / tvd (loss and aux) keeps h_j there, so that pass 3 (the gradient) computes one
//   exponential per element. HBM traffic per row: V (E_s + E_t) read, W E_s written.
//   Rows whose start is not 16-byte aligned (GPT-2's V = 50257, vocabulary slices) are copied as
//   aligned 16-byte vectors, with element loads for the partial vectors at the ends of the row,
//   and realigned in shared memory (word reads and funnel shifts); misaligned gradient rows are
//   staged in shared memory and written as aligned vectors with element stores at the ends.
//   Either way thread t handles the same columns: results do not depend on a row's alignment.
//
// distill_stream_kernel (fallback: student and teacher of different dtypes, rows too wide for
//   16 CTAs of shared memory, sm_80 rows wider than one CTA's): one block per row streams the row
//   from global memory two times (forward / reverse / symmetric KL) or three times (jsd, skew,
//   tvd), 16-byte loads for 16-byte aligned rows, element loads otherwise.
//
// Pass 1 in both: per thread, per unit of N columns (16 bytes of the student), the unit's maxima
// of the raw logits (a new running maximum is rare), then u = fma(z, k, -m) and 2^u (one
// MUFU.EX2, ex2.approx.ftz). The KL numerators are taken without their -inf guards, and a unit
// whose partial numerator is not finite (a -inf logit) is redone with the guarded terms of
// divergence.h; the same holds for the loss terms of pass 2. All math is float32; reductions are
// fixed shuffle trees and fixed merge orders (deterministic, no atomics).
//
// Ignored rows / bad labels: W E_s written (zeros), nothing read.
// Aliasing: grad may be the student buffer. Every global read of a row's student logits happens
// in pass 1 (into shared memory or registers) before any thread writes that row's gradient (the
// resident kernel reads z_s[label] from shared memory; the stream kernel's threads read each of
// their units before writing it, and the owner of the label's column reads it first).

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "fastdistill/divergence.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;     // stream kernel
constexpr int kResThreads = 256;  // resident kernel, at most (the launcher sizes it to the slice)
static_assert(kThreads % kWarp == 0 && kResThreads % kWarp == 0, "whole warps");

// Per-call constants computed on the host (they sit in the parameter bank).
struct Consts {
  float ks, kt, kh;  // log2-domain multipliers: s_mul, t_mul, h_mul times log2(e)
  float hr;          // h_mul / s_mul: the hard loss's shift is m_1 = m_s hr
  MixWeights mw;
};

// ---- pass 1: per-thread running statistics ------------------------------------------------------
// The divergence statistics (divergence.h: Online, shifts m = maxima of k z) and, for a hard loss
// with its own multiplier (h_mul != s_mul), the shifted sum d1 of 2^(k_h z_s - m_1), with the
// shift m_1 = m_s h_mul / s_mul derived from the student's (within an ulp or two of max k_h z_s,
// which is all a shift needs: every pass uses the same one), so it needs no maximum of its own.
struct Pass1 {
  Online<float> o;
  float d1;
};

// Moves a state to the larger maxima (ms, mt) without adding anything: the x-half of
// online_merge.
template <int32_t DIV>
__device__ __forceinline__ void shift_to(Pass1& x, float ms, float mt, const Consts& K,
                                         bool hard_sep) {
  Online<float>& o = x.o;
  const float fs = rescale_factor(o.m_s, ms), ft = rescale_factor(o.m_t, mt);
  if (hard_sep) x.d1 *= rescale_factor(o.m_s * K.hr, ms * K.hr);
  if (uses_wf(DIV)) o.wf = shift_numerator(o.wf, o.d_t, ft, o.m_t, mt, o.m_s, ms);
  if (uses_wr(DIV)) o.wr = shift_numerator(o.wr, o.d_s, fs, o.m_s, ms, o.m_t, mt);
  o.d_s *= fs;
  o.d_t *= ft;
  o.m_s = ms;
  o.m_t = mt;
}

// x <- union of the streams of x and y (online_merge, plus d1)
template <int32_t DIV>
__device__ __forceinline__ void merge(Pass1& x, const Pass1& y, const Consts& K, bool hard_sep) {
  if (hard_sep) {
    const float m = fmaxf(x.o.m_s, y.o.m_s) * K.hr;
    x.d1 = x.d1 * rescale_factor(x.o.m_s * K.hr, m) + y.d1 * rescale_factor(y.o.m_s * K.hr, m);
  }
  online_merge<DIV>(x.o, y.o);
}

__device__ __forceinline__ bool is_finite(float x) { return x - x == 0.0f; }



// Adds the columns [G0, G0 + G) of one unit (zs, zt as float; -inf past the row's end) to x.
template <int32_t DIV, int G0, int G, int N>
__device__ __forceinline__ void accumulate_group(Pass1& x, const float (&zs)[N],
                                                 const float (&zt)[N], const Consts& K,
                                                 bool hard_sep) {
  float ums = zs[G0], umt = zt[G0];
#pragma unroll
  for (int k = G0 + 1; k < G0 + G; ++k) {
    ums = fmaxf(ums, zs[k]);
    umt = fmaxf(umt, zt[k]);
  }
  ums *= K.ks;  // the group's shifts (k > 0: the max of k z)
  umt *= K.kt;
  // a new maximum: rare after the first units
  if (ums > x.o.m_s || umt > x.o.m_t)
    shift_to<DIV>(x, fmaxf(x.o.m_s, ums), fmaxf(x.o.m_t, umt), K, hard_sep);
  const float shs = finite_shift(x.o.m_s), sht = finite_shift(x.o.m_t);
  float us[G], ut[G], es[G], et[G];
#pragma unroll
  for (int k = 0; k < G; ++k) {
    us[k] = fmaf(zs[G0 + k], K.ks, -shs);
    ut[k] = fmaf(zt[G0 + k], K.kt, -sht);
    es[k] = fd_exp2(us[k]);
    et[k] = fd_exp2(ut[k]);
    x.o.d_s += es[k];
    x.o.d_t += et[k];
  }
  if (uses_wf(DIV) || uses_wr(DIV)) {
    float wf = 0.0f, wr = 0.0f;
#pragma unroll
    for (int k = 0; k < G; ++k) {
      if (uses_wf(DIV)) wf = fmaf(et[k], ut[k] - us[k], wf);
      if (uses_wr(DIV)) wr = fmaf(es[k], us[k] - ut[k], wr);
    }
    if (!is_finite(wf + wr)) {  // a -inf (or NaN) logit in the group: the guarded terms
      wf = 0.0f;
      wr = 0.0f;
#pragma unroll
      for (int k = 0; k < G; ++k) {
        if (uses_wf(DIV)) wf += wf_term(us[k], ut[k], et[k]);
        if (uses_wr(DIV)) wr += wr_term(us[k], ut[k], es[k]);
      }
    }
    x.o.wf += wf;
    x.o.wr += wr;
  }
  if (hard_sep) {
#pragma unroll
    const float sh1 = finite_shift(x.o.m_s * K.hr);
#pragma unroll
    for (int k = 0; k < G; ++k) x.d1 += fd_exp2(fmaf(zs[G0 + k], K.kh, -sh1));
  }
}

// Adds the N columns of one unit to x, in groups of G columns (a running-maximum check per
// group; smaller groups hold fewer values at once).
template <int32_t DIV, int G, int N>
__device__ __forceinline__ void accumulate(Pass1& x, const float (&zs)[N], const float (&zt)[N],
                                           const Consts& K, bool hard_sep) {
  static_assert(N % G == 0, "whole groups");
  accumulate_group<DIV, 0, G>(x, zs, zt, K, hard_sep);
  if constexpr (N > G) accumulate_group<DIV, G, G>(x, zs, zt, K, hard_sep);
  if constexpr (N > 2 * G) accumulate_group<DIV, 2 * G, G>(x, zs, zt, K, hard_sep);
  if constexpr (N > 3 * G) accumulate_group<DIV, 3 * G, G>(x, zs, zt, K, hard_sep);
  static_assert(N <= 4 * G, "at most four groups");
}

// Floats a state travels as through shuffles and shared memory: only what DIV uses.
template <int32_t DIV>
constexpr int pass1_floats() {
  return 5 + int(uses_wf(DIV)) + int(uses_wr(DIV));
}

template <int32_t DIV>
__device__ __forceinline__ void to_array(const Pass1& x, float (&v)[pass1_floats<DIV>()]) {
  int i = 0;
  v[i++] = x.o.m_s; v[i++] = x.o.m_t; v[i++] = x.o.d_s; v[i++] = x.o.d_t; v[i++] = x.d1;
  if (uses_wf(DIV)) v[i++] = x.o.wf;
  if (uses_wr(DIV)) v[i++] = x.o.wr;
}

template <int32_t DIV>
__device__ __forceinline__ Pass1 from_array(const float (&v)[pass1_floats<DIV>()]) {
  Pass1 x{Online<float>{v[0], v[1], v[2], v[3], 0.0f, 0.0f}, v[4]};
  int i = 5;
  if (uses_wf(DIV)) x.o.wf = v[i++];
  if (uses_wr(DIV)) x.o.wr = v[i++];
  return x;
}

__device__ __forceinline__ Pass1 empty_pass1() { return Pass1{online_empty<float>(), 0.0f}; }

// The sums of a state (everything but the shifts), as an array for the sum reductions.
template <int32_t DIV>
constexpr int pass1_sums() {
  return pass1_floats<DIV>() - 2;
}

template <int32_t DIV>
__device__ __forceinline__ void sums_of(const Pass1& x, float (&v)[pass1_sums<DIV>()]) {
  int i = 0;
  v[i++] = x.o.d_s; v[i++] = x.o.d_t; v[i++] = x.d1;
  if (uses_wf(DIV)) v[i++] = x.o.wf;
  if (uses_wr(DIV)) v[i++] = x.o.wr;
}

template <int32_t DIV>
__device__ __forceinline__ Pass1 with_sums(float ms, float mt,
                                           const float (&v)[pass1_sums<DIV>()]) {
  Pass1 x{Online<float>{ms, mt, v[0], v[1], 0.0f, 0.0f}, v[2]};
  int i = 3;
  if (uses_wf(DIV)) x.o.wf = v[i++];
  if (uses_wr(DIV)) x.o.wr = v[i++];
  return x;
}

__device__ __forceinline__ float warp_max_all(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;  // in every lane
}

// The union of the states of a warp, in lane 0, in two steps: the maxima (every state is moved to
// them: one rescale per state), then plain sums (fixed trees: deterministic).
template <int32_t DIV>
__device__ __forceinline__ Pass1 warp_merge(Pass1 x, const Consts& K, bool hard_sep) {
  const float ms = warp_max_all(x.o.m_s), mt = warp_max_all(x.o.m_t);
  if (ms != x.o.m_s || mt != x.o.m_t) shift_to<DIV>(x, ms, mt, K, hard_sep);
  float v[pass1_sums<DIV>()];
  sums_of<DIV>(x, v);
#pragma unroll
  for (int i = 0; i < pass1_sums<DIV>(); ++i) v[i] = warp_sum(v[i]);
  return with_sums<DIV>(ms, mt, v);
}

// The block's pass-1 state, returned to every thread, in the same two steps: the block's maxima,
// then the sums. sm: kScratch floats ((kWarp + 1) * 8), the maxima in its last 64.
template <int32_t DIV>
__device__ __forceinline__ Pass1 block_merge(Pass1 x, const Consts& K, bool hard_sep, float* sm) {
  constexpr int Q = pass1_sums<DIV>();
  static_assert(kWarp * Q + Q <= (kWarp + 1) * 8 - 2 * kWarp, "scratch regions do not overlap");
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  float* smax = sm + (kWarp + 1) * 8 - 2 * kWarp;
  float ms = warp_max_all(x.o.m_s), mt = warp_max_all(x.o.m_t);
  if (lane == 0) {
    smax[2 * warp] = ms;
    smax[2 * warp + 1] = mt;
  }
  __syncthreads();
  for (int w = 0; w < nwarps; ++w) {
    ms = fmaxf(ms, smax[2 * w]);
    mt = fmaxf(mt, smax[2 * w + 1]);
  }
  if (ms != x.o.m_s || mt != x.o.m_t) shift_to<DIV>(x, ms, mt, K, hard_sep);
  float v[Q];
  sums_of<DIV>(x, v);
  block_sum<Q>(v, sm);
  return with_sums<DIV>(ms, mt, v);
}

// The row's statistics from its merged pass-1 state (per row: accurate log2f).
struct Row {
  RowStats st;
  bool ok;
  float div;  // the divergence known after pass 1 (KL family)
};

template <int32_t DIV>
__device__ __forceinline__ Row finish_pass1(const Pass1& R, float beta, float hr, bool hard_sep) {
  Row r;
  r.ok = row_ok(R.o.d_s, R.o.d_t);
  r.st.m_s = R.o.m_s;
  r.st.l_s = log2f(R.o.d_s);
  r.st.m_t = R.o.m_t;
  r.st.l_t = log2f(R.o.d_t);
  r.st.m_1 = hard_sep ? R.o.m_s * hr : r.st.m_s;
  r.st.l_1 = hard_sep ? log2f(R.d1) : r.st.l_s;
  float rkl2 = 0.0f;
  r.div = pass1_divergence<DIV>(R.o, beta, rkl2);
  r.st.aux = rkl2;
  return r;
}

// ---- pass 2: loss and aux = sum q h of the mixture and tvd divergences --------------------------
// One unit: adds its loss terms (unit of loss_unit<DIV>) and q h terms, and sets h[k] = h_j.
// Unguarded formulas; a unit whose sums are not finite (a -inf logit) is redone with pass2_elem.
template <int32_t DIV, int N>
__device__ __forceinline__ void pass2_unit(const float (&zs)[N], const float (&zt)[N],
                                           const RowStats& st, const Consts& K, float& loss,
                                           float& aux, float (&h)[N]) {
  const MixWeights& w = K.mw;
  float lq2[N], lp2[N];
  float l = 0.0f, a = 0.0f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    lq2[k] = log2_prob(zs[k], st.m_s, K.ks, st.l_s);
    lp2[k] = log2_prob(zt[k], st.m_t, K.kt, st.l_t);
    const float q = fd_exp2(lq2[k]), p = fd_exp2(lp2[k]);
    if constexpr (DIV == kTVD) {
      const float d = q - p;
      h[k] = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
      a = fmaf(q, h[k], a);
      l += fabsf(d);
    } else {
      const float m = fmaf(w.wp, p, w.wq * q);
      const float lm2 = mix_log2(m, lp2[k], lq2[k], w);
      const float dq = lq2[k] - lm2, dp = lp2[k] - lm2;
      if constexpr (DIV == kJSD) {
        h[k] = (1.0f - w.beta) * kLn2 * dq;
        l = fmaf(w.beta * p, dp, l);
        a = fmaf(q, dq, a);  // the (1 - beta) part of the loss and, times (1 - beta) ln 2, aux
      } else if constexpr (DIV == kSkewForwardKL) {
        h[k] = -w.wq * fd_exp2(dp);  // -wq p / m
        l = fmaf(p, dp, l);
        a = fmaf(q, h[k], a);
      } else {  // kSkewReverseKL
        h[k] = kLn2 * dq - w.wq * fd_exp2(dq);  // lq - lm - wq q / m
        l = fmaf(q, dq, l);
        a = fmaf(q, h[k], a);
      }
    }
  }
  if constexpr (DIV == kJSD) {
    l = fmaf(1.0f - w.beta, a, l);
    a *= (1.0f - w.beta) * kLn2;
  }
  if constexpr (DIV == kTVD) l *= 0.5f;
  if (DIV != kTVD && !is_finite(l + a)) {  // -inf logits: the guarded terms
    l = 0.0f;
    a = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float qh;
      l += pass2_elem<DIV>(lq2[k], lp2[k], w, qh, h[k]);
      a += qh;
    }
  }
  loss += l;
  aux += a;
}

// ---- pass 3: the gradient of one unit -----------------------------------------------------------
// Per-row constants of the gradient.
struct GradConsts {
  float cs;  // grad_scale soft_scale s_mul (d/dz = s_mul d/da)
  float ch;  // grad_scale hard_weight h_mul (0: no hard loss)
  // The KL family from the shifted exponentials e_s = 2^(k_s z_s - m_s), e_t = 2^(k_t z_t - m_t)
  // and x = u_s - u_t - (l_s - l_t + aux) = lq2 - lp2 - aux (log2 units):
  //   g = e_s (a1 x + b1) - c1 e_t
  // forward KL: a1 = 0, b1 = cs 2^-l_s, c1 = cs 2^-l_t; reverse KL: a1 = ln 2 cs 2^-l_s, b1 = 0,
  // c1 = 0; symmetric KL with ratio r: a1 = (1 - r) ln 2 cs 2^-l_s, b1 = r cs 2^-l_s,
  // c1 = r cs 2^-l_t; plus ch 2^-l_s in b1 when the hard loss shares the student's LSE.
  float a1, b1, c1, x0;
};

template <int32_t DIV>
__device__ __forceinline__ GradConsts grad_consts(const RowStats& st, float gscale,
                                                  const DistillParams& P, bool hard,
                                                  bool hard_sep) {
  GradConsts c;
  c.cs = gscale * P.soft_scale * P.s_mul;
  c.ch = hard ? gscale * P.hard_weight * P.h_mul : 0.0f;
  const float ps = fd_exp2(-st.l_s), pt = fd_exp2(-st.l_t);
  const float r = DIV == kForwardKL ? 1.0f : (DIV == kReverseKL ? 0.0f : P.beta);
  c.a1 = (1.0f - r) * kLn2 * c.cs * ps;
  c.b1 = (r * c.cs + (hard && !hard_sep ? c.ch : 0.0f)) * ps;
  c.c1 = r * c.cs * pt;
  c.x0 = st.l_s - st.l_t + st.aux;
  return c;
}

// g[k] = dloss/dz_s for the columns of the unit, from the row's statistics (and h when pass 2
// kept it: use_h, H); the hard loss (c.ch != 0) in a block of its own after the soft part (one
// branch per unit; lk = the label's position in the unit, or out of [0, N)).
template <int32_t DIV, int N>
__device__ __forceinline__ void grad_unit(const float (&zs)[N], const float (&zt)[N],
                                          bool use_h, const float (&H)[N], const RowStats& st,
                                          const Consts& K, const GradConsts& c, bool hard_sep,
                                          int lk, float (&g)[N]) {
  const float aux = st.aux;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if constexpr (DIV == kForwardKL) {
      const float es = fd_exp2(fmaf(zs[k], K.ks, -st.m_s));
      const float et = fd_exp2(fmaf(zt[k], K.kt, -st.m_t));
      g[k] = fmaf(c.b1, es, -c.c1 * et);
    } else if (!use_h && (DIV == kReverseKL || DIV == kSymmetricKL)) {
      // no guard on lq - lp: the clamps keep 0 (-inf - -inf) out where q = 0; a row whose lp2
      // is -inf where q > 0 has an undefined gradient (NaN, set by the caller)
      const float us = fmaf(zs[k], K.ks, -st.m_s), ut = fmaf(zt[k], K.kt, -st.m_t);
      const float es = fd_exp2(us);
      const float x = (fmaxf(us, -1e30f) - fmaxf(ut, -1e35f)) - c.x0;
      float v = es * fmaf(c.a1, x, c.b1);
      if (DIV == kSymmetricKL) v = fmaf(-c.c1, fd_exp2(ut), v);
      g[k] = v;
    } else {
      const float lq2 = log2_prob(zs[k], st.m_s, K.ks, st.l_s);
      const float q = fd_exp2(lq2);
      const float d = use_h ? grad_from_h(q, H[k], aux)
                            : soft_grad<DIV>(lq2, log2_prob(zt[k], st.m_t, K.kt, st.l_t), K.mw,
                                             aux);
      g[k] = c.cs * d;
    }
  }
  if (c.ch != 0.0f) {
    // the softmax of h_mul z_s, minus 1 at the label
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float m = hard_sep ? st.m_1 : st.m_s, l = hard_sep ? st.l_1 : st.l_s;
      const float kk = hard_sep ? K.kh : K.ks;
      // (in b1 for the KL family when it shares the student's LSE)
      const bool in_b1 = !hard_sep && (DIV == kForwardKL || (!use_h && (DIV == kReverseKL ||
                                                                         DIV == kSymmetricKL)));
      if (!in_b1) g[k] = fmaf(c.ch, fd_exp2(log2_prob(zs[k], m, kk, l)), g[k]);
      if (k == lk) g[k] -= c.ch;
    }
  }
}

// ---- stream kernel ------------------------------------------------------------------------------

// Calls f(c, zs, zt) for this thread's units with first column c < end, in order. zs, zt hold
// columns c .. c + N - 1 of student and teacher as float (-inf at columns >= limit, which are
// not read). The next unit's loads are issued before f runs on the current one.
template <int32_t SD, typename F>
__device__ __forceinline__ void for_each_unit(const void* srow, const void* trow, int32_t t_dtype,
                                              int end, int limit, bool vec, F&& f) {
  constexpr int N = unit_cols<SD>(), kStep = kThreads * N;
  int c = int(threadIdx.x) * N;
  if (c >= end) return;
  Raw<N> rs = load_raw<SD, N, false>(srow, c, limit - c, vec);
  Raw<N> rt = load_raw_rt<N, true>(trow, t_dtype, c, limit - c, vec);
  for (;;) {
    const int cn = c + kStep;
    const bool more = cn < end;
    Raw<N> ns, nt;
    if (more) {
      ns = load_raw<SD, N, false>(srow, cn, limit - cn, vec);
      nt = load_raw_rt<N, true>(trow, t_dtype, cn, limit - cn, vec);
    }
    float zs[N], zt[N];
    to_floats<SD>(rs, limit - c, -fd_inf(), zs);
    to_floats_rt(rt, t_dtype, limit - c, -fd_inf(), zt);
    f(c, zs, zt);
    if (!more) break;
    rs = ns;
    rt = nt;
    c = cn;
  }
}

struct KernelArgs {
  DistillArgs a;
  Consts k;
};

// The hard loss: CE = LSE(h z) - h z[label] = (m_1 - k_h z[label] + l_1) ln 2, the difference
// formed by one fused multiply-add (no cancellation of large logits), and the row's loss.
__device__ __forceinline__ float row_loss(const Row& r, float div, float soft_scale,
                                          float hard_weight, bool hard, float z_label, float kh) {
  const double hard_loss =
      hard ? double(kLn2) * (-double(fmaf(z_label, kh, -r.st.m_1)) + double(r.st.l_1)) : 0.0;
  return r.ok ? float(double(soft_scale) * double(div) + double(hard_weight) * hard_loss)
              : fd_nan();
}

// At least 3 blocks per SM: ptxas may then use up to 85 registers.
template <int32_t SD, int32_t DIV>
__global__ void __launch_bounds__(kThreads, 3) distill_stream_kernel(const KernelArgs KA) {
  const DistillArgs& A = KA.a;
  const Consts& K = KA.k;
  __shared__ float sm1[(kWarp + 1) * 8];
  __shared__ float sm2[(kWarp + 1) * 2];
  constexpr int N = unit_cols<SD>();
  const int64_t row = blockIdx.x;
  const DistillParams& P = A.params;
  const int V = int(P.vocab), W = int(A.grad_width);
  const int64_t s_elt = elem_size(SD);
  const void* srow = static_cast<const char*>(A.student) + row * A.s_stride * s_elt;
  const void* trow = static_cast<const char*>(A.teacher) + row * A.t_stride * elem_size(A.t_dtype);
  void* grow = A.grad ? static_cast<char*>(A.grad) + row * A.g_stride * s_elt : nullptr;
  const bool vec_out = grow != nullptr && aligned16(grow);

  const bool has_label = A.labels != nullptr;
  const int64_t label = has_label ? A.labels[row] : 0;
  const bool hard = P.hard_weight != 0.0f && has_label;
  // Ignored rows, and labels out of range for the hard loss (NaN, as the CPU kernel; the Python
  // side rejects them for CPU tensors only, to avoid a sync): no reads, zero gradient.
  const bool ignored = has_label && label == P.ignore_index;
  if (ignored || (hard && (label < 0 || label >= V))) {
    if (threadIdx.x == 0) A.loss_rows[row] = ignored ? 0.0f : fd_nan();
    if (grow) zero_row<SD>(grow, W, vec_out);
    return;
  }
  const bool hard_sep = hard && P.h_mul != P.s_mul;  // CE needs its own LSE
  const bool vec = aligned16(srow) && aligned16(trow);

  // ---- pass 1 ----
  Pass1 x = empty_pass1();
  for_each_unit<SD>(srow, trow, A.t_dtype, V, V, vec,
                    [&](int, const float(&zs)[N], const float(&zt)[N]) {
                      accumulate<DIV, 4>(x, zs, zt, K, hard_sep);
                    });
  Row r = finish_pass1<DIV>(block_merge<DIV>(x, K, hard_sep, sm1), P.beta, K.hr, hard_sep);
  float div = r.div;

  // ---- pass 2: loss and aux for the mixture / tvd divergences (block-uniform branch) ----
  if (needs_pass2(DIV) && r.ok) {
    float acc[2] = {0.0f, 0.0f};  // loss, aux
    for_each_unit<SD>(srow, trow, A.t_dtype, V, V, vec,
                      [&](int, const float(&zs)[N], const float(&zt)[N]) {
                        float h[N];
                        pass2_unit<DIV>(zs, zt, r.st, K, acc[0], acc[1], h);
                      });
    block_sum<2>(acc, sm2);
    div = loss_unit<DIV>() * acc[0];
    r.st.aux = acc[1];
  }

  // Written by the thread that owns the label's column (thread 0 without a hard loss): it
  // reads z_s[label] before it may overwrite that column with the gradient (aliasing).
  const int lab = hard ? int(label) : -1;  // in [0, V) when used
  if (threadIdx.x == (hard ? (lab / N) % kThreads : 0)) {
    const float zl = hard ? load_one<SD>(srow, lab) : 0.0f;
    A.loss_rows[row] = row_loss(r, div, P.soft_scale, P.hard_weight, hard, zl, K.kh);
  }

  // ---- pass 3: gradient, columns >= V zero; NaN where the row's gradient is undefined ----
  if (!grow) return;
  const bool nan_row = !r.ok || grad_undefined<DIV>(r.st.aux);
  const GradConsts gc = grad_consts<DIV>(r.st, *A.grad_scale, P, hard, hard_sep);
  for_each_unit<SD>(srow, trow, A.t_dtype, W, V, vec,
                    [&](int c, const float(&zs)[N], const float(&zt)[N]) {
                      float g[N];
                      grad_unit<DIV>(zs, zt, false, zt, r.st, K, gc, hard_sep, lab - c, g);
#pragma unroll
                      for (int k = 0; k < N; ++k)
                        g[k] = k < V - c ? (nan_row ? fd_nan() : g[k]) : 0.0f;
                      store_unit<SD>(grow, c, W - c, vec_out, g);
                    });
}

// ---- resident kernel ----------------------------------------------------------------------------
//
// Shared memory of one CTA (dynamic, 16-byte slots), for a slice of `su` units:
//   header   kHeaderSlots slots: the exchange areas read by the other CTAs of the cluster
//            (pass-1 state, pass-2 sums) and the block-reduction scratch
//   S        su + 1 slots: the student slice, one unit per slot after realignment (the extra slot
//            holds the tail of a misaligned row's last vector until then); pass 3 stages the
//            gradient of a misaligned gradient row here
//   T        su + 1 slots: the teacher slice; h_j in place of the unit (float32 rows; tvd, whose
//            h_j is exact in every dtype)
//   H        su N floats: h_j of 16-bit rows for jsd / skew_* (when pass 2 keeps it)
constexpr int kXchgFloats = 16;                         // [0, 8): pass 1, [8, 10): pass 2
constexpr int kScratchFloats = (kWarp + 1) * 8;         // block_merge / block_sum
constexpr int kHeaderSlots = (kXchgFloats + kScratchFloats) * 4 / 16;
static_assert((kXchgFloats + kScratchFloats) % 4 == 0, "whole slots");

// Is h_j kept in the teacher's slot (same dtype), or in H (float32)?
template <int32_t DT, int32_t DIV>
constexpr bool h_in_place() {
  return DT == kFloat32 || DIV == kTVD;
}

// Bytes of shared memory for a slice of su units (launcher and kernel agree through this).
template <int32_t DT, int32_t DIV>
constexpr int64_t resident_bytes(int64_t su, bool store_h) {
  return 16 * (kHeaderSlots + 2 * (su + 1)) +
         (store_h && needs_pass2(DIV) && !h_in_place<DT, DIV>() ? 4 * su * unit_cols<DT>() : 0);
}

struct ResidentArgs {
  DistillArgs a;
  Consts k;
  int32_t cluster;      // C: CTAs per row (a thread-block cluster when > 1)
  int32_t slice_units;  // su: units (of N columns) per CTA
  int32_t store_h;      // pass 2 keeps h_j for the gradient (jsd, skew_*, tvd with a gradient)
};

template <int32_t DT>
__device__ __forceinline__ uint32_t neg_inf_bits() {
  return DT == kFloat32 ? 0xff800000u : (DT == kBFloat16 ? 0xff80u : 0xfc00u);
}

// A row's slice as 16-byte vectors: vector i is the aligned 16 bytes at base + 16 i, base =
// (row & ~15) + c0 E; vectors [full_lo, full_hi) lie wholly inside the row's bytes [lo, hi).
struct SliceVectors {
  uintptr_t base, lo, hi;
  int full_lo, full_hi;
};

template <int32_t DT>
__device__ __forceinline__ SliceVectors slice_vectors(const void* row, int c0, int V) {
  constexpr int E = DT == kFloat32 ? 4 : 2;
  SliceVectors sv;
  sv.lo = reinterpret_cast<uintptr_t>(row);
  sv.hi = sv.lo + uintptr_t(V) * E;
  sv.base = (sv.lo & ~uintptr_t(15)) + uintptr_t(c0) * E;
  sv.full_lo = sv.base < sv.lo ? 1 : 0;  // only the first slice of a misaligned row
  sv.full_hi = sv.hi >= sv.base + 16 ? int((sv.hi - sv.base) / 16) : 0;
  return sv;
}

// Vector i of a slice into the slot `dst`: by cp.async when it lies wholly inside the row, else
// element by element (-inf bits outside the row).
template <int32_t DT>
__device__ __forceinline__ void stage_vector(const SliceVectors& sv, int i, uint4* dst) {
  constexpr int E = DT == kFloat32 ? 4 : 2;
  const uintptr_t v = sv.base + uintptr_t(i) * 16;
  if (i >= sv.full_lo && i < sv.full_hi) {
    copy_async16(dst, reinterpret_cast<const void*>(v));
    return;
  }
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < 16 / E; ++e) {
    const uintptr_t p = v + uintptr_t(e) * E;
    const bool in = p >= sv.lo && p + E <= sv.hi;
    uint32_t bits;
    if (E == 4)
      bits = in ? *reinterpret_cast<const uint32_t*>(p) : neg_inf_bits<DT>();
    else
      bits = in ? uint32_t(*reinterpret_cast<const uint16_t*>(p)) : neg_inf_bits<DT>();
    if (E == 4)
      w[e] = bits;
    else
      w[e / 2] |= bits << (16 * (e % 2));
  }
  *dst = make_uint4(w[0], w[1], w[2], w[3]);
}

template <int32_t DT, int N>
__device__ __forceinline__ void slot_floats(uint4 v, float (&x)[N]) {
  Raw<N> r;
  r.w[0] = v.x; r.w[1] = v.y; r.w[2] = v.z; r.w[3] = v.w;
#pragma unroll
  for (int i = 4; i < N; ++i) r.w[i] = 0u;
  to_floats<DT>(r, N, 0.0f, x);
}

template <int32_t DT, int N>
__device__ __forceinline__ uint4 floats_slot(const float (&g)[N]) {
  if (DT == kFloat32) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]),
                      __float_as_uint(g[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack2<DT>(g[2 * i], g[2 * i + 1]);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Writes value to the columns [c_begin, c_end) of a gradient row: aligned 16-byte stores, scalar
// stores at the ends. All threads of the block.
template <int32_t DT>
__device__ __forceinline__ void fill_columns(void* row, int c_begin, int c_end, float value) {
  constexpr int E = DT == kFloat32 ? 4 : 2, N = 16 / E;
  if (c_end <= c_begin) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  const uintptr_t lo = a + uintptr_t(c_begin) * E, hi = a + uintptr_t(c_end) * E;
  const uintptr_t first = (lo + 15) & ~uintptr_t(15), last = hi & ~uintptr_t(15);
  float g[N];
#pragma unroll
  for (int k = 0; k < N; ++k) g[k] = value;
  const uint4 v = floats_slot<DT>(g);
  if (first < last) {
    const uintptr_t step = uintptr_t(blockDim.x) * 16;
    for (uintptr_t p = first + uintptr_t(threadIdx.x) * 16; p < last; p += step)
      *reinterpret_cast<uint4*>(p) = v;
  }
  // the scalar ends: [lo, min(first, hi)) and [max(last, first), hi)
  const int head = int((first < hi ? first : hi) - lo) / E;
  const int tail_start = int(((last > first ? last : first) - a) / E);
  const int n_tail = c_end - (tail_start > c_begin ? tail_start : c_begin);
  for (int i = threadIdx.x; i < head + (first < hi ? n_tail : 0); i += blockDim.x) {
    const int c = i < head ? c_begin + i : c_end - n_tail + (i - head);
    if (DT == kFloat32)
      static_cast<float*>(row)[c] = value;
    else
      static_cast<uint16_t*>(row)[c] = to_bits16<DT>(value);
  }
}

template <int32_t DT, int32_t DIV>
__global__ void __launch_bounds__(kResThreads, 3) distill_kernel(const ResidentArgs RA) {
  extern __shared__ uint4 fd_smem[];
  constexpr int N = unit_cols<DT>();
  constexpr int E = DT == kFloat32 ? 4 : 2;
  constexpr int Q = pass1_floats<DIV>();
  const DistillArgs& A = RA.a;
  const DistillParams& P = A.params;
  const Consts& K = RA.k;
  const int C = RA.cluster, su = RA.slice_units;
  const int rank = int(blockIdx.x % unsigned(C));
  const int64_t row = int64_t(blockIdx.x / unsigned(C));
  const int V = int(P.vocab), W = int(A.grad_width);
  const int T = int(blockDim.x), tid = int(threadIdx.x);
  const int c0 = rank * su * N;                               // first column of the slice
  const int cv = min(c0 + su * N, V);                         // end of its real columns
  const int U = cv > c0 ? (cv - c0 + N - 1) / N : 0;          // its units
  const int cw = rank == C - 1 ? W : min(c0 + su * N, W);     // end of its gradient columns
  const void* srow = static_cast<const char*>(A.student) + row * A.s_stride * E;
  const void* trow = static_cast<const char*>(A.teacher) + row * A.t_stride * E;
  void* grow = A.grad ? static_cast<char*>(A.grad) + row * A.g_stride * E : nullptr;

  const bool has_label = A.labels != nullptr;
  const int64_t label = has_label ? A.labels[row] : 0;
  const bool hard = P.hard_weight != 0.0f && has_label;
  const bool ignored = has_label && label == P.ignore_index;
  if (ignored || (hard && (label < 0 || label >= V))) {  // the same branch in every CTA of the row
    if (rank == 0 && tid == 0) A.loss_rows[row] = ignored ? 0.0f : fd_nan();
    if (grow) fill_columns<DT>(grow, c0, cw, 0.0f);
    return;
  }
  const bool hard_sep = hard && P.h_mul != P.s_mul;

  float* xchg = reinterpret_cast<float*>(fd_smem);
  float* scratch = xchg + kXchgFloats;
  uint4* S = fd_smem + kHeaderSlots;
  uint4* Tt = S + (su + 1);
  float* H = reinterpret_cast<float*>(Tt + (su + 1));

  // ---- pass 1: the slice into shared memory, statistics while it lands ----
  const int as = int(reinterpret_cast<uintptr_t>(srow) & 15);
  const int at = int(reinterpret_cast<uintptr_t>(trow) & 15);
  Pass1 x = empty_pass1();
  if (as == 0 && at == 0) {
    // Thread t copies and consumes the units t, t + T, ...: kDepth of them in flight, one commit
    // group each (empty past the end), so the wait before unit i is for all but the kDepth - 1
    // newest groups: a constant. A partial last unit (the row's end) is loaded element by
    // element beforehand.
    constexpr int kDepth = 8;
    const int uf = (cv - c0) / N;  // whole units
    if (uf < U && tid == uf % T) {
      stage_vector<DT>(slice_vectors<DT>(srow, c0, V), uf, S + uf);
      stage_vector<DT>(slice_vectors<DT>(trow, c0, V), uf, Tt + uf);
    }
    const uint4* gs = reinterpret_cast<const uint4*>(srow) + c0 / N;
    const uint4* gt = reinterpret_cast<const uint4*>(trow) + c0 / N;
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int u = tid + i * T;
      if (u < uf) {
        copy_async16(S + u, gs + u);
        copy_async16(Tt + u, gt + u);
      }
      commit_async();
    }
    for (int u = tid; u < U; u += T) {
      wait_async(kDepth - 1);
      float zs[N], zt[N];
      slot_floats<DT>(S[u], zs);
      slot_floats<DT>(Tt[u], zt);
      const int un = u + kDepth * T;
      if (un < uf) {
        copy_async16(S + un, gs + un);
        copy_async16(Tt + un, gt + un);
      }
      commit_async();
      accumulate<DIV, N>(x, zs, zt, K, hard_sep);
    }
  } else {
    // Copy every vector (one more than the units for a misaligned row: its last unit ends in
    // it), then realign in place, one round of T units at a time: unit u reads slots u and
    // u + 1 (read all, barrier, write all); the next round reads slots no thread has written.
    const int nvs = U + (as != 0 && U > 0), nvt = U + (at != 0 && U > 0);
    const SliceVectors svs = slice_vectors<DT>(srow, c0, V), svt = slice_vectors<DT>(trow, c0, V);
    for (int i = tid; i < (nvs > nvt ? nvs : nvt); i += T) {
      if (i < nvs) stage_vector<DT>(svs, i, S + i);
      if (i < nvt) stage_vector<DT>(svt, i, Tt + i);
    }
    commit_async();
    wait_async(0);
    __syncthreads();
    const uint32_t* ws = reinterpret_cast<const uint32_t*>(S);
    const uint32_t* wt = reinterpret_cast<const uint32_t*>(Tt);
    for (int base = 0; base < U; base += T) {
      const int u = base + tid;
      uint4 vs = make_uint4(0, 0, 0, 0), vt = vs;
      if (u < U) {
        vs = read_shifted(ws + 4 * u, as);
        vt = read_shifted(wt + 4 * u, at);
      }
      __syncthreads();
      if (u < U) {
        S[u] = vs;
        Tt[u] = vt;
        float zs[N], zt[N];
        slot_floats<DT>(vs, zs);
        slot_floats<DT>(vt, zt);
        accumulate<DIV, N>(x, zs, zt, K, hard_sep);
      }
    }
  }
  Pass1 R = block_merge<DIV>(x, K, hard_sep, scratch);
  if (C > 1) {
    // the CTA's state to the cluster; every CTA merges the C states in the same order
    if (tid == 0) {
      float v[Q];
      to_array<DIV>(R, v);
#pragma unroll
      for (int i = 0; i < Q; ++i) xchg[i] = v[i];
    }
    cluster_sync();
    if (tid < kWarp) {
      Pass1 y = empty_pass1();
      if (tid < C) {
        const float* peer = cluster_peer(xchg, tid);
        float v[Q];
#pragma unroll
        for (int i = 0; i < Q; ++i) v[i] = peer[i];
        y = from_array<DIV>(v);
      }
      y = warp_merge<DIV>(y, K, hard_sep);
      if (tid == 0) {
        float v[Q];
        to_array<DIV>(y, v);
#pragma unroll
        for (int i = 0; i < Q; ++i) scratch[kWarp * 8 + i] = v[i];
      }
    }
    __syncthreads();
    float v[Q];
#pragma unroll
    for (int i = 0; i < Q; ++i) v[i] = scratch[kWarp * 8 + i];
    R = from_array<DIV>(v);
  }
  Row r = finish_pass1<DIV>(R, P.beta, K.hr, hard_sep);
  float div = r.div;

  // ---- pass 2 (jsd, skew_*, tvd): loss and aux from shared memory, h_j kept ----
  const bool keep_h = RA.store_h != 0;
  if (needs_pass2(DIV) && r.ok) {
    float acc[2] = {0.0f, 0.0f};
    for (int u = tid; u < U; u += T) {
      float zs[N], zt[N], h[N];
      slot_floats<DT>(S[u], zs);
      slot_floats<DT>(Tt[u], zt);
      pass2_unit<DIV>(zs, zt, r.st, K, acc[0], acc[1], h);
      if (keep_h) {
        if (h_in_place<DT, DIV>()) {
          Tt[u] = floats_slot<DT>(h);
        } else {
#pragma unroll
          for (int i = 0; i < N; i += 4)
            *reinterpret_cast<float4*>(H + u * N + i) =
                make_float4(h[i], h[i + 1], h[i + 2], h[i + 3]);
        }
      }
    }
    block_sum<2>(acc, scratch);
    if (C > 1) {
      if (tid == 0) {
        xchg[8] = acc[0];
        xchg[9] = acc[1];
      }
      cluster_sync();
      if (tid < kWarp) {
        float l = 0.0f, a = 0.0f;
        if (tid < C) {
          const float* peer = cluster_peer(xchg, tid);
          l = peer[8];
          a = peer[9];
        }
        l = warp_sum(l);
        a = warp_sum(a);
        if (tid == 0) {
          scratch[kWarp * 8] = l;
          scratch[kWarp * 8 + 1] = a;
        }
      }
      __syncthreads();
      acc[0] = scratch[kWarp * 8];
      acc[1] = scratch[kWarp * 8 + 1];
    }
    div = loss_unit<DIV>() * acc[0];
    r.st.aux = acc[1];
  }
  // no CTA reads another's shared memory after this point; none may exit before all have read
  if (C > 1) cluster_arrive();

  // The loss: by the CTA that holds the label's column (rank 0 without a hard loss), from
  // shared memory (the gradient may overwrite the student in global memory).
  const int lab = hard ? int(label) : -1;
  // The thread that owns the label's unit writes the loss: it reads z_s[label] from its own slot
  // before it may stage the gradient there.
  const bool mine = hard ? (lab >= c0 && lab < cv) : rank == 0;
  if (mine && tid == (hard ? ((lab - c0) / N) % T : 0)) {
    float zl = 0.0f;
    if (hard) {
      const int j = lab - c0;
      if (E == 4) {
        zl = reinterpret_cast<const float*>(S)[j];
      } else {
        const uint16_t hbits = reinterpret_cast<const uint16_t*>(S)[j];
        zl = DT == kBFloat16 ? __uint_as_float(uint32_t(hbits) << 16)
                             : __half2float(__ushort_as_half(hbits));
      }
    }
    A.loss_rows[row] = row_loss(r, div, P.soft_scale, P.hard_weight, hard, zl, K.kh);
  }

  // ---- pass 3: the gradient from shared memory ----
  if (grow) {
    const bool nan_row = !r.ok || grad_undefined<DIV>(r.st.aux);
    const int ag = int(reinterpret_cast<uintptr_t>(grow) & 15);
    char* gbase = static_cast<char*>(grow) + int64_t(c0) * E;
    if (nan_row) {
      fill_columns<DT>(grow, c0, cv > c0 ? cv : c0, fd_nan());
    } else {
      const GradConsts gc = grad_consts<DIV>(r.st, *A.grad_scale, P, hard, hard_sep);
      const bool use_h = needs_pass2(DIV) && keep_h;
      for (int u = tid; u < U; u += T) {
        float zs[N], zt[N], g[N];
        slot_floats<DT>(S[u], zs);
        if (use_h && !h_in_place<DT, DIV>()) {
#pragma unroll
          for (int i = 0; i < N; i += 4) {
            const float4 f = *reinterpret_cast<const float4*>(H + u * N + i);
            zt[i] = f.x; zt[i + 1] = f.y; zt[i + 2] = f.z; zt[i + 3] = f.w;
          }
        } else {
          slot_floats<DT>(Tt[u], zt);  // the teacher's logits, or h in their place
        }
        grad_unit<DIV>(zs, zt, use_h, zt, r.st, K, gc, hard_sep, lab - (c0 + u * N), g);
        const int n = cv - (c0 + u * N);  // columns of the unit in the row: N but for the last
        if (ag == 0 && n >= N) {
          *reinterpret_cast<uint4*>(gbase + int64_t(u) * 16) = floats_slot<DT>(g);
        } else if (ag == 0) {
#pragma unroll
          for (int k = 0; k < N; ++k) {
            if (k >= n) continue;
            if (DT == kFloat32)
              reinterpret_cast<float*>(gbase)[u * N + k] = g[k];
            else
              reinterpret_cast<uint16_t*>(gbase)[u * N + k] = to_bits16<DT>(g[k]);
          }
        } else {
          S[u] = floats_slot<DT>(g);  // staged: this thread has read S[u], nobody else reads it
        }
      }
    if (ag != 0 && U > 0) {
      // misaligned gradient row: aligned 16-byte stores out of the staged slots (output vector i
      // holds the slice's bytes [16 i - ag, 16 i - ag + 16)), element stores at the slice's ends
      __syncthreads();
      const uint32_t* ws = reinterpret_cast<const uint32_t*>(S);
      const uintptr_t lo = reinterpret_cast<uintptr_t>(gbase);
      const uintptr_t hi = lo + uintptr_t(cv - c0) * E;
      const uintptr_t vbase = lo & ~uintptr_t(15);
      for (int i = tid; i <= U; i += T) {
        const uintptr_t v = vbase + uintptr_t(i) * 16;
        if (v >= lo && v + 16 <= hi) {
          *reinterpret_cast<uint4*>(v) = read_shifted(ws + 4 * (i - 1), 16 - ag);
        } else {
          for (int e = 0; e < 16 / E; ++e) {
            const uintptr_t p = v + uintptr_t(e) * E;
            if (p < lo || p + E > hi) continue;
            const int j = int((p - lo) / E);  // column of the slice
            if (E == 4)
              *reinterpret_cast<uint32_t*>(p) = reinterpret_cast<const uint32_t*>(S)[j];
            else
              *reinterpret_cast<uint16_t*>(p) = reinterpret_cast<const uint16_t*>(S)[j];
          }
        }
      }
    }
    }
    fill_columns<DT>(grow, cv > c0 ? cv : c0, cw, 0.0f);  // columns >= V (the last CTA)
  }
  if (C > 1) cluster_wait();
}

// ---- launchers ----------------------------------------------------------------------------------

// What the launcher needs to know of the device (queried once per device and thread; host
// calls that do not synchronise).
struct DeviceInfo {
  int device = -1;
  int major = 0;
  int smem_optin = 0;  // dynamic shared memory per block with the opt-in attribute
};

DeviceInfo device_info() {
  thread_local DeviceInfo cached;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return DeviceInfo{};
  if (cached.device != dev) {
    DeviceInfo d;
    d.device = dev;
    if (cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
            cudaSuccess)
      return DeviceInfo{};
    cached = d;
  }
  return cached;
}

// The resident kernel's configuration for a call, or cluster = 0 (use the stream kernel).
struct Plan {
  int cluster = 0;
  int slice_units = 0;
  bool store_h = false;
  int threads = 0;
  int64_t bytes = 0;
};

// Threads of a CTA for a slice of su units: every thread loops over ceil(su / T) units; among
// whole-warp sizes up to kResThreads (at least 128 where the slice allows), the one that leaves
// the fewest idle unit slots (fewer loop trips on a tie).
int resident_threads(int64_t su) {
  const int64_t t0 = (su + kResThreads - 1) / kResThreads;
  int best_t = kResThreads;
  double best_eff = -1.0;
  for (int64_t trips = t0; trips <= t0 + 2; ++trips) {
    int64_t th = ((su + trips - 1) / trips + kWarp - 1) / kWarp * kWarp;
    th = th < kWarp ? kWarp : th;
    if (th < 128 && trips > t0) break;
    const double eff = double(su) / double(trips * th);
    if (eff > best_eff + 1e-9) {
      best_eff = eff;
      best_t = int(th);
    }
  }
  return best_t;
}

// Shared memory that leaves room for 3 CTAs per SM (228 KB on sm_90, 164 KB on sm_80).
constexpr int64_t kPreferredBytes = 72 << 10;

template <int32_t DT, int32_t DIV>
Plan plan_resident(const DistillArgs& A, const DeviceInfo& dev) {
  Plan best;
  if (A.t_dtype != DT || dev.major < 8) return best;
  constexpr int N = unit_cols<DT>();
  const int64_t V = A.params.vocab;
  const int max_cluster = dev.major >= 9 ? 16 : 1;
  const bool want_h = needs_pass2(DIV) && A.grad != nullptr;
  // in order: h kept within the preferred size (the smallest cluster that fits), h kept within
  // the opt-in maximum (the largest cluster: the smallest slice, the most CTAs per SM), then the
  // same without h (pass 3 recomputes it)
  struct Tier {
    bool h;
    int64_t limit;
    bool smallest;
  };
  const Tier tiers[4] = {{true, kPreferredBytes, true}, {true, dev.smem_optin, false},
                         {false, kPreferredBytes, true}, {false, dev.smem_optin, false}};
  for (const Tier& t : tiers) {
    if (t.h && !want_h) continue;
    for (int i = 0; i < 5; ++i) {
      const int C = t.smallest ? (1 << i) : (16 >> i);
      if (C > max_cluster) continue;
      const int64_t su = ((V + C - 1) / C + N - 1) / N;
      const int64_t bytes = resident_bytes<DT, DIV>(su, t.h);
      if (bytes > t.limit || bytes > dev.smem_optin || A.n_rows * C > kMaxRows) continue;
      best.cluster = C;
      best.slice_units = int(su);
      best.store_h = t.h;
      best.bytes = bytes;
      best.threads = resident_threads(su);
      return best;
    }
  }
  return best;
}

// The launch configuration of the resident kernel: one cluster of pl.cluster CTAs per row (no
// cluster attribute for one CTA). Not copyable: cfg.attrs points into the object.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(const Plan& pl, int64_t n_rows, cudaStream_t stream) {
    cfg.gridDim = dim3(static_cast<unsigned int>(n_rows * pl.cluster));
    cfg.blockDim = dim3(static_cast<unsigned int>(pl.threads));
    cfg.dynamicSmemBytes = size_t(pl.bytes);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned int>(pl.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pl.cluster > 1 ? 1 : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

template <int32_t DT, int32_t DIV>
int32_t launch_resident(const DistillArgs& A, const Consts& K, const Plan& pl,
                        cudaStream_t stream) {
  auto kernel = distill_kernel<DT, DIV>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(pl.bytes));
  if (err == cudaSuccess && pl.cluster > 8)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err != cudaSuccess) return fail(err);
  const ResidentArgs RA{A, K, pl.cluster, pl.slice_units, pl.store_h ? 1 : 0};
  const ClusterLaunch L(pl, A.n_rows, stream);
  err = cudaLaunchKernelEx(&L.cfg, kernel, RA);
  return err == cudaSuccess ? launch_status() : fail(err);
}

// Can clusters of this size run at all (16 CTAs of this much shared memory on one GPC)?
template <int32_t DT, int32_t DIV>
bool cluster_fits(const Plan& pl, int64_t n_rows, cudaStream_t stream) {
  if (pl.cluster <= 8) return true;
  auto kernel = distill_kernel<DT, DIV>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
          cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(pl.bytes)) !=
          cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const ClusterLaunch L(pl, n_rows, stream);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &L.cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return clusters > 0;
}

// The kernel a call runs (the resident kernel's plan; cluster == 0: the stream kernel).
template <int32_t SD>
Plan plan(const DistillArgs& A, cudaStream_t stream) {
  const DeviceInfo dev = device_info();
  Plan pl;
  dispatch_divergence(A.params.divergence, [&](auto tag) {
    constexpr int32_t DIV = decltype(tag)::value;
    pl = plan_resident<SD, DIV>(A, dev);
    if (pl.cluster > 8 && !cluster_fits<SD, DIV>(pl, A.n_rows, stream)) pl = Plan{};
  });
  return pl;
}

template <int32_t SD>
int32_t launch(const DistillArgs& A, cudaStream_t stream) {
  const Plan pl = plan<SD>(A, stream);
  int32_t status = kOk;
  dispatch_divergence(A.params.divergence, [&](auto tag) {
    constexpr int32_t DIV = decltype(tag)::value;
    const Consts K{A.params.s_mul * kLog2e, A.params.t_mul * kLog2e, A.params.h_mul * kLog2e,
                   A.params.h_ratio, mix_weights<DIV>(A.params.beta)};
    if (pl.cluster) {
      status = launch_resident<SD, DIV>(A, K, pl, stream);
    } else {
      const dim3 grid(static_cast<unsigned int>(A.n_rows));
      distill_stream_kernel<SD, DIV><<<grid, kThreads, 0, stream>>>(KernelArgs{A, K});
      status = launch_status();
    }
  });
  return status;
}

}  // namespace

// Which kernel distill_rows would run for A (diagnostics and tests): the resident kernel's
// cluster size, slice (units per CTA) and whether pass 2 keeps h; cluster 0 = the stream kernel.
int32_t distill_plan(const DistillArgs& A, int32_t* cluster, int32_t* slice_units,
                     int32_t* store_h) {
  Plan pl;
  cudaStream_t s = static_cast<cudaStream_t>(A.stream);
  switch (A.s_dtype) {
    case kFloat32: pl = plan<kFloat32>(A, s); break;
    case kFloat16: pl = plan<kFloat16>(A, s); break;
    case kBFloat16: pl = plan<kBFloat16>(A, s); break;
    default: return kUnsupportedDType;
  }
  *cluster = pl.cluster;
  *slice_units = pl.slice_units;
  *store_h = pl.store_h ? 1 : 0;
  return kOk;
}

int32_t distill_rows(const DistillArgs& A) {
  const DistillParams& P = A.params;
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.t_dtype < 0 || A.t_dtype > 2) return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;  // nothing to read or write (empty tensors have no data)
  if (P.vocab <= 0 || A.n_rows < 0 || A.n_rows > kMaxRows || !A.student || !A.teacher ||
      !A.loss_rows ||
      (A.grad && (A.grad_width < P.vocab || A.grad_width > kMaxCols || !A.grad_scale)) ||
      P.vocab > kMaxCols || P.divergence < 0 || P.divergence > kSymmetricKL)
    return kBadArgument;
  cudaStream_t s = static_cast<cudaStream_t>(A.stream);
  switch (A.s_dtype) {
    case kFloat32: return launch<kFloat32>(A, s);
    case kFloat16: return launch<kFloat16>(A, s);
    default: return launch<kBFloat16>(A, s);
  }
}

}  // namespace cuda
}  // namespace fastdistill
