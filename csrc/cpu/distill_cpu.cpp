// Logit-level distillation loss and student gradient on the host.
//
// One OpenMP thread per row at a time; each row is streamed in chunks of kChunk columns that are
// converted to float32 in L1-resident buffers, and the math of csrc/include/fastdistill/
// divergence.h runs in the log2 domain: u = fma(z, k, -m) with k = mul log2(e), then 2^u by the
// polynomial of fast_math.h, in `#pragma omp simd` loops. The AVX-512 variant runs pass 1 of
// every divergence and pass 3 of forward KL as explicit vector code (2^u in 10 instructions with
// VSCALEFPS; the KL numerators unguarded, the chunk redone with the guarded terms where a -inf
// logit makes them non-finite) and writes float32 gradients with non-temporal stores; large
// gradient buffers get transparent huge pages (advise_huge_pages).
//
// Passes over a row (reads of both inputs, writes of the gradient; the re-reads come from cache
// for rows up to a few hundred KB):
//   forward_kl, reverse_kl, symmetric_kl:  pass 1 (online LSEs + divergence), pass 3 (gradient):
//                                          2 reads, 1 write
//   jsd, skew_*, tvd:                      pass 1, pass 2 (loss and aux), pass 3: 3 reads, 1 write
// Ignored rows write zeros and read nothing. Without a gradient, pass 3 is skipped.
// Extra memory: three chunk buffers per thread, and for jsd, skew_* and tvd one row of h_j
// (V floats) per thread, so that pass 3 does not redo the mixture's logarithm. Row
// sums are taken per chunk in float and across chunks in double, in a fixed order: results are
// bitwise reproducible for a given ISA variant.
//
// Compiled once per ISA level with -DFD_ISA=<namespace> (see setup.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "fastdistill/divergence.h"
#include "fastdistill/dtype.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef FD_ISA
#define FD_ISA base
#endif

namespace fastdistill {
namespace cpu {
namespace FD_ISA {
namespace {

constexpr int kChunk = 1024;
#if defined(__AVX512F__)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

// Columns [j0, j0 + n) of a row as float32: the row itself for float32 rows, else converted
// into `buf`.
const float* load_chunk(const void* row, int32_t dtype, int64_t j0, int n, float* __restrict buf) {
  if (dtype == kFloat32) return static_cast<const float*>(row) + j0;
  float* __restrict out = buf;
  if (dtype == kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + j0;
#pragma omp simd
    for (int i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + j0;
#pragma omp simd
    for (int i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
  }
  return buf;
}

// Copies n floats with non-temporal stores where the destination is 64-byte aligned (AVX-512):
// the gradient is written once and not read again here, and a plain store would first read
// the line from memory (read for ownership), a third more traffic. Callers end with a fence.
void copy_out(float* __restrict dst, const float* __restrict src, int n) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63u) == 0) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::memcpy(dst, src, sizeof(float) * n);
}

// row[j0 + i] = in[i] in `dtype`
void store_chunk(void* row, int32_t dtype, int64_t j0, int n, const float* __restrict in) {
  if (dtype == kFloat32) {
    copy_out(static_cast<float*>(row) + j0, in, n);
  } else if (dtype == kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(row) + j0;
#pragma omp simd
    for (int i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]);
  } else {
    uint16_t* p = static_cast<uint16_t*>(row) + j0;
#pragma omp simd
    for (int i = 0; i < n; ++i) p[i] = float_to_fp16(in[i]);
  }
}

void zero_row(void* row, int32_t dtype, int64_t j0, int64_t j1) {
  if (j1 <= j0) return;
  const size_t elt = dtype == kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(row) + j0 * elt, 0, (j1 - j0) * elt);
}

// Both chunk maxima of the raw logits in one sweep, ignoring NaN (NaN then reaches the sums
// through the exponentials). The multipliers are positive, so max(k z) = k max(z), rounded once.
// A plain compare and select: std::fmax is an out-of-line libm call that does not vectorise.
void chunk_max2(const float* __restrict x, const float* __restrict y, int n, float& mx,
                float& my) {
  float a = -fd_inf(), b = -fd_inf();
#pragma omp simd reduction(max : a, b)
  for (int i = 0; i < n; ++i) {
    a = x[i] > a ? x[i] : a;
    b = y[i] > b ? y[i] : b;
  }
  mx = a;
  my = b;
}

// Chunk sums of pass 1 (shifted sums and the KL numerators, relative to the chunk maxima).
struct ChunkSums {
  float ds, dt, wf, wr;
};

// Pass 1 of one chunk, portable: the guarded element terms of divergence.h.
template <int32_t DIV>
ChunkSums chunk_pass1(const float* __restrict zs, const float* __restrict zt, int n, float shs,
                      float sht, float ks, float kt) {
  float ds = 0.0f, dt = 0.0f, wf = 0.0f, wr = 0.0f;
#pragma omp simd reduction(+ : ds, dt, wf, wr)
  for (int i = 0; i < n; ++i) {
    const float us = fd_fma(zs[i], ks, -shs), ut = fd_fma(zt[i], kt, -sht);
    const float es = fd_exp2(us), et = fd_exp2(ut);
    ds += es;
    dt += et;
    if (uses_wf(DIV)) wf += wf_term(us, ut, et);
    if (uses_wr(DIV)) wr += wr_term(us, ut, es);
  }
  return ChunkSums{ds, dt, wf, wr};
}

#if defined(__AVX512F__)
// AVX-512: 2^x for x <= 0 (or NaN) in 10 instructions: x = n + f with n = round(x), 2^f from the
// polynomial of fd_exp2, scaled by 2^n with VSCALEFPS (exact at -inf and NaN; results below
// 2^-126 are subnormal here, not flushed). Max against -150 keeps f finite at x = -inf; VMAXPS
// returns its second operand, x, when x is NaN.
inline __m512 exp2_le0(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.53533852e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.33988785e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61843692e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55033237e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226477e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147182e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Pass 1 of one chunk with the numerator terms unguarded: e_t (u_t - u_s) is NaN or +inf where a
// logit is -inf, and then the chunk is redone with the guarded terms (false returned).
template <int32_t DIV>
bool chunk_pass1_avx512(const float* __restrict zs, const float* __restrict zt, int n, float shs,
                        float sht, float ks, float kt, ChunkSums& out) {
  const __m512 vshs = _mm512_set1_ps(-shs), vsht = _mm512_set1_ps(-sht);
  const __m512 vks = _mm512_set1_ps(ks), vkt = _mm512_set1_ps(kt);
  const __m512 ninf = _mm512_set1_ps(-fd_inf());
  __m512 ds = _mm512_setzero_ps(), dt = ds, wf = ds, wr = ds;
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    const __m512 us = _mm512_fmadd_ps(_mm512_mask_loadu_ps(ninf, k, zs + i), vks, vshs);
    const __m512 ut = _mm512_fmadd_ps(_mm512_mask_loadu_ps(ninf, k, zt + i), vkt, vsht);
    const __m512 es = exp2_le0(us), et = exp2_le0(ut);
    ds = _mm512_add_ps(ds, es);
    dt = _mm512_add_ps(dt, et);
    if (uses_wf(DIV)) wf = _mm512_mask3_fmadd_ps(et, _mm512_sub_ps(ut, us), wf, k);
    if (uses_wr(DIV)) wr = _mm512_mask3_fmadd_ps(es, _mm512_sub_ps(us, ut), wr, k);
  }
  out = ChunkSums{_mm512_reduce_add_ps(ds), _mm512_reduce_add_ps(dt), _mm512_reduce_add_ps(wf),
                  _mm512_reduce_add_ps(wr)};
  const float w = out.wf + out.wr;
  return w - w == 0.0f;  // finite
}

// Pass 3 of forward KL: g = c (q - p), with q, p from log2_prob. No guards: -inf logits give
// q = 0 or p = 0 exactly.
inline void grad_fkl_avx512(const float* __restrict zs, const float* __restrict zt, int n,
                            const RowStats& st, float ks, float kt, float c,
                            float* __restrict g) {
  const __m512 ms = _mm512_set1_ps(-st.m_s), mt = _mm512_set1_ps(-st.m_t);
  const __m512 ls = _mm512_set1_ps(st.l_s), lt = _mm512_set1_ps(st.l_t);
  const __m512 vks = _mm512_set1_ps(ks), vkt = _mm512_set1_ps(kt), vc = _mm512_set1_ps(c);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1u);
    const __m512 zsv = _mm512_maskz_loadu_ps(k, zs + i), ztv = _mm512_maskz_loadu_ps(k, zt + i);
    const __m512 lq2 = _mm512_sub_ps(_mm512_fmadd_ps(zsv, vks, ms), ls);
    const __m512 lp2 = _mm512_sub_ps(_mm512_fmadd_ps(ztv, vkt, mt), lt);
    const __m512 d = _mm512_sub_ps(exp2_le0(lq2), exp2_le0(lp2));
    _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(d, vc));
  }
}
#endif

// Plain online log2-sum-exp of k z (the hard loss when h_mul != s_mul); cm = k times the chunk's
// maximum raw logit.
struct OnlineLSE {
  float m = -fd_inf();
  double d = 0.0;
  void add(const float* __restrict z, int n, float cm, float k) {
    const float sh = finite_shift(cm);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += fd_exp2(fd_fma(z[i], k, -sh));
    const float m_new = cm > m ? cm : m;
    d = d * (double)rescale_factor(m, m_new) + (double)s * (double)rescale_factor(cm, m_new);
    m = m_new;
  }
};

void fill_row(void* row, int32_t dtype, int64_t width, float value, float* __restrict buf) {
  for (int64_t j0 = 0; j0 < width; j0 += kChunk) {
    const int n = (int)(width - j0 < kChunk ? width - j0 : kChunk);
    for (int i = 0; i < n; ++i) buf[i] = value;
    store_chunk(row, dtype, j0, n, buf);
  }
}

template <int32_t DIV>
void row_kernel(const void* srow, int32_t s_dtype, const void* trow, int32_t t_dtype, int64_t label,
                bool has_label, void* grow, int64_t grad_width, float* loss_out,
                const DistillParams& P, float grad_scale, float* __restrict bs,
                float* __restrict bt, float* __restrict g, float* __restrict hrow) {
  const int64_t V = P.vocab;
  // log2-domain multipliers (divergence.h)
  const float ks = P.s_mul * kLog2e, kt = P.t_mul * kLog2e, kh = P.h_mul * kLog2e;
  const bool hard = P.hard_weight != 0.0f && has_label;
  const bool hard_sep = hard && P.h_mul != P.s_mul;  // CE needs its own LSE
  if (hard && (label < 0 || label >= V)) {  // the Python side rejects these for CPU tensors
    *loss_out = fd_nan();
    if (grow) zero_row(grow, s_dtype, 0, grad_width);
    return;
  }

  // ---- pass 1: online statistics of k_s zs and k_t zt (and of k_h zs for CE) ----
  Online<double> row = online_empty<double>();
  OnlineLSE o1;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    // the chunk's own statistics, relative to its maxima, then merged into the row's
    float mzs, mzt;
    chunk_max2(zs, zt, n, mzs, mzt);
    const float ms = mzs * ks, mt = mzt * kt;  // the chunk's shifts
    const float shs = finite_shift(ms), sht = finite_shift(mt);
    ChunkSums c;
#if defined(__AVX512F__)
    if (!chunk_pass1_avx512<DIV>(zs, zt, n, shs, sht, ks, kt, c))
#endif
      c = chunk_pass1<DIV>(zs, zt, n, shs, sht, ks, kt);
    online_merge<DIV>(row, Online<double>{ms, mt, c.ds, c.dt, c.wf, c.wr});
    if (hard_sep) o1.add(zs, n, mzs * kh, kh);
  }
  const bool ok = row_ok((float)row.d_s, (float)row.d_t);
  RowStats st;
  st.m_s = row.m_s;
  st.l_s = (float)std::log2(row.d_s);
  st.m_t = row.m_t;
  st.l_t = (float)std::log2(row.d_t);
  st.m_1 = hard_sep ? o1.m : st.m_s;
  st.l_1 = hard_sep ? (float)std::log2(o1.d) : st.l_s;
  double rkl2 = 0.0;
  double div = pass1_divergence<DIV>(row, P.beta, rkl2);
  st.aux = (float)rkl2;
  const MixWeights mw = mix_weights<DIV>(P.beta);

  // ---- pass 2: loss and aux for the mixture / tvd divergences ----
  if (needs_pass2(DIV) && ok) {
    double loss = 0.0, aux = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
      const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
      const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
      const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
      const float ms = st.m_s, ls = st.l_s, mt = st.m_t, lt = st.l_t;
      float l = 0.0f, x = 0.0f;
      float* __restrict hh = hrow + j0;  // h_j, kept for pass 3
#pragma omp simd reduction(+ : l, x)
      for (int i = 0; i < n; ++i) {
        float qh;
        l += pass2_elem<DIV>(log2_prob(zs[i], ms, ks, ls), log2_prob(zt[i], mt, kt, lt), mw, qh,
                             hh[i]);
        x += qh;
      }
      loss += l;
      aux += x;
    }
    div = (double)loss_unit<DIV>() * loss;
    st.aux = (float)aux;
  }

  double hard_loss = 0.0;
  if (hard) {
    // CE = LSE(h z) - h z[label] = (m_1 - k_h z[label] + log2 d_1) ln 2, the difference formed
    // by one fused multiply-add: no cancellation of large logits
    const double d1 = hard_sep ? o1.d : row.d_s;
    hard_loss = (double)kLn2 * (-(double)fd_fma(load_as_float(srow, label, s_dtype), kh, -st.m_1) +
                                std::log2(d1));
  }
  *loss_out = ok ? (float)((double)P.soft_scale * div + (double)P.hard_weight * hard_loss)
                 : fd_nan();

  // ---- pass 3: gradient ----
  if (!grow) return;
  if (!ok || grad_undefined<DIV>(st.aux)) {
    fill_row(grow, s_dtype, V, fd_nan(), g);
    zero_row(grow, s_dtype, V, grad_width);
    return;
  }
  const float cg = grad_scale * P.soft_scale * P.s_mul;  // d/dz = s_mul d/da
  const float ch = hard ? grad_scale * P.hard_weight * P.h_mul : 0.0f;
  const float ms = st.m_s, ls = st.l_s, mt = st.m_t, lt = st.l_t, m1 = st.m_1, l1 = st.l_1;
  const float aux = st.aux;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    if (needs_pass2(DIV)) {
      // g = q (h - aux) from the h_j of pass 2: one exponential per element instead of the
      // mixture's two exponentials and its logarithm again
      const float* __restrict hh = hrow + j0;
      if (hard_sep) {
#pragma omp simd
        for (int i = 0; i < n; ++i)
          g[i] = cg * grad_from_h(fd_exp2(log2_prob(zs[i], ms, ks, ls)), hh[i], aux) +
                 ch * fd_exp2(log2_prob(zs[i], m1, kh, l1));
      } else {
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          const float q = fd_exp2(log2_prob(zs[i], ms, ks, ls));
          g[i] = cg * grad_from_h(q, hh[i], aux) + ch * q;
        }
      }
      if (ch != 0.0f && label >= j0 && label < j0 + n) g[label - j0] -= ch;
    } else if (ch != 0.0f) {
      // two loops, not a select inside one: the select kept the loop from vectorising
      if (hard_sep) {
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          const float q1 = fd_exp2(log2_prob(zs[i], m1, kh, l1));
          g[i] = cg * soft_grad<DIV>(log2_prob(zs[i], ms, ks, ls), log2_prob(zt[i], mt, kt, lt),
                                     mw, aux) + ch * q1;
        }
      } else {
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          const float lq2 = log2_prob(zs[i], ms, ks, ls);
          g[i] = cg * soft_grad<DIV>(lq2, log2_prob(zt[i], mt, kt, lt), mw, aux) +
                 ch * fd_exp2(lq2);
        }
      }
      if (label >= j0 && label < j0 + n) g[label - j0] -= ch;
    } else if (DIV == kForwardKL && kAvx512) {
#if defined(__AVX512F__)
      grad_fkl_avx512(zs, zt, n, st, ks, kt, cg, g);
#endif
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i)
        g[i] = cg * soft_grad<DIV>(log2_prob(zs[i], ms, ks, ls), log2_prob(zt[i], mt, kt, lt), mw,
                                   aux);
    }
    store_chunk(grow, s_dtype, j0, n, g);
  }
  zero_row(grow, s_dtype, V, grad_width);
}

// A gradient of many megabytes is usually fresh memory (glibc maps large blocks anew, and the
// allocator of the caller hands them over untouched): writing it faults every 4 KB page in, a
// kernel entry that costs as much as the arithmetic here. Transparent huge pages (where the
// system leaves them to madvise) make those faults 2 MB each. Advice only: nothing changes if
// the pages are already there or the call fails.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (p == nullptr || bytes < 16 * kHuge) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

int32_t distill_rows(const DistillArgs& A) {
  const DistillParams& P = A.params;
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.t_dtype < 0 || A.t_dtype > 2) return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;  // nothing to read or write (empty tensors have no data)
  if (P.vocab <= 0 || A.n_rows < 0 || !A.student || !A.teacher || !A.loss_rows ||
      (A.grad && (A.grad_width < P.vocab || !A.grad_scale)) || P.divergence < 0 ||
      P.divergence > kSymmetricKL)
    return kBadArgument;
  const size_t s_elt = A.s_dtype == kFloat32 ? 4 : 2, t_elt = A.t_dtype == kFloat32 ? 4 : 2;
  const int nt = A.num_threads > 0 ? A.num_threads : 1;
  const float grad_scale = A.grad ? *A.grad_scale : 0.0f;
  advise_huge_pages(A.grad, (size_t)A.n_rows * (size_t)A.g_stride * s_elt);

#pragma omp parallel num_threads(nt)
  {
    alignas(64) float zs[kChunk];
    alignas(64) float zt[kChunk];
    alignas(64) float g[kChunk];
    // h_j of the whole row for the mixture / tvd gradients (pass 2 to pass 3), V floats
    std::vector<float> hrow(needs_pass2(P.divergence) ? (size_t)P.vocab : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < A.n_rows; ++r) {
      const void* srow = static_cast<const char*>(A.student) + (size_t)r * A.s_stride * s_elt;
      const void* trow = static_cast<const char*>(A.teacher) + (size_t)r * A.t_stride * t_elt;
      void* grow = A.grad ? static_cast<char*>(A.grad) + (size_t)r * A.g_stride * s_elt : nullptr;
      const int64_t label = A.labels ? A.labels[r] : 0;
      if (A.labels && label == P.ignore_index) {
        A.loss_rows[r] = 0.0f;
        if (grow) zero_row(grow, A.s_dtype, 0, A.grad_width);
        continue;
      }
      dispatch_divergence(P.divergence, [&](auto tag) {
        row_kernel<decltype(tag)::value>(srow, A.s_dtype, trow, A.t_dtype, label,
                                         A.labels != nullptr, grow, A.grad_width,
                                         &A.loss_rows[r], P, grad_scale, zs, zt, g,
                                         hrow.empty() ? nullptr : hrow.data());
      });
    }
#if defined(__AVX512F__)
    _mm_sfence();  // the non-temporal stores of copy_out are visible before the threads join
#endif
  }
  return kOk;
}

}  // namespace FD_ISA
}  // namespace cpu
}  // namespace fastdistill
