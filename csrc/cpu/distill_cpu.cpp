// Logit-level distillation loss and student gradient on the host.
//
// One OpenMP thread per row at a time; each row is streamed in chunks of kChunk columns that are
// converted to float32 in L1-resident buffers, and the math of csrc/include/fastdistill/
// divergence.h runs in `#pragma omp simd` loops (polynomial exp/log, so they vectorise).
//
// Passes over a row (reads of both inputs, writes of the gradient):
//   forward_kl, reverse_kl, symmetric_kl:  pass 1 (online LSEs + divergence), pass 3 (gradient):
//                                          2 reads, 1 write
//   jsd, skew_*, tvd:                      pass 1, pass 2 (loss and aux), pass 3: 3 reads, 1 write
// Ignored rows write zeros and read nothing. Without a gradient, pass 3 is skipped.
// Extra memory: two chunk buffers per thread. Row sums are taken per chunk in float and across
// chunks in double, in a fixed order: results are bitwise reproducible for a given ISA variant.
//
// Compiled once per ISA level with -DFD_ISA=<namespace> (see setup.py).

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"
#include "fastdistill/divergence.h"
#include "fastdistill/dtype.h"

#ifndef FD_ISA
#define FD_ISA base
#endif

namespace fastdistill {
namespace cpu {
namespace FD_ISA {
namespace {

constexpr int kChunk = 1024;

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

// row[j0 + i] = in[i] in `dtype`
void store_chunk(void* row, int32_t dtype, int64_t j0, int n, const float* __restrict in) {
  if (dtype == kFloat32) {
    std::memcpy(static_cast<float*>(row) + j0, in, sizeof(float) * n);
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

// max_i x[i] * scale, ignoring NaN (NaN then reaches the sums through exp). A plain compare and
// select: std::fmax is an out-of-line libm call that does not vectorise.
float chunk_max(const float* __restrict x, int n, float scale) {
  float m = -fd_inf();
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) {
    const float v = x[i] * scale;
    m = v > m ? v : m;
  }
  return m;
}

// Both chunk maxima in one sweep.
void chunk_max2(const float* __restrict x, const float* __restrict y, int n, float sx, float sy,
                float& mx, float& my) {
  float a = -fd_inf(), b = -fd_inf();
#pragma omp simd reduction(max : a, b)
  for (int i = 0; i < n; ++i) {
    const float u = x[i] * sx, v = y[i] * sy;
    a = u > a ? u : a;
    b = v > b ? v : b;
  }
  mx = a;
  my = b;
}

// Plain online log-sum-exp of x * scale (the hard loss when h_mul != s_mul).
struct OnlineLSE {
  float m = -fd_inf();
  double d = 0.0;
  void add(const float* __restrict z, int n, float scale) {
    const float cm = chunk_max(z, n, scale);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) {
      const float x = z[i] * scale;
      s += x == -fd_inf() ? 0.0f : fd_exp(x - cm);
    }
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
                float* __restrict bt, float* __restrict g) {
  const int64_t V = P.vocab;
  const float sm = P.s_mul, tm = P.t_mul, hm = P.h_mul;
  const bool hard = P.hard_weight != 0.0f && has_label;
  const bool hard_sep = hard && hm != sm;  // CE needs its own LSE
  if (hard && (label < 0 || label >= V)) {  // the Python side rejects these for CPU tensors
    *loss_out = fd_nan();
    if (grow) zero_row(grow, s_dtype, 0, grad_width);
    return;
  }

  // ---- pass 1: online statistics of a = s_mul zs and b = t_mul zt (and of h_mul zs for CE) ----
  Online<double> row = online_empty<double>();
  OnlineLSE o1;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    // the chunk's own statistics, relative to its maxima, then merged into the row's
    float cms, cmt;
    chunk_max2(zs, zt, n, sm, tm, cms, cmt);
    float ds = 0.0f, dt = 0.0f, wf = 0.0f, wr = 0.0f;
#pragma omp simd reduction(+ : ds, dt, wf, wr)
    for (int i = 0; i < n; ++i) {
      const float a = zs[i] * sm, b = zt[i] * tm;
      const float es = a == -fd_inf() ? 0.0f : fd_exp(a - cms);
      const float et = b == -fd_inf() ? 0.0f : fd_exp(b - cmt);
      ds += es;
      dt += et;
      if (uses_wf(DIV)) wf += wf_term(a, b, cms, cmt, et);
      if (uses_wr(DIV)) wr += wr_term(a, b, cms, cmt, es);
    }
    online_merge<DIV>(row, Online<double>{cms, cmt, ds, dt, wf, wr});
    if (hard_sep) o1.add(zs, n, hm);
  }
  const bool ok = row_ok((float)row.d_s, (float)row.d_t);
  RowStats st;
  st.m_s = row.m_s;
  st.ld_s = (float)std::log(row.d_s);
  st.m_t = row.m_t;
  st.ld_t = (float)std::log(row.d_t);
  st.m_1 = hard_sep ? o1.m : st.m_s;
  st.ld_1 = hard_sep ? (float)std::log(o1.d) : st.ld_s;
  double rkl = 0.0;
  double div = pass1_divergence<DIV>(row, P.beta, rkl);
  st.aux = (float)rkl;
  const MixWeights mw = mix_weights<DIV>(P.beta);

  // ---- pass 2: loss and aux for the mixture / tvd divergences ----
  if (needs_pass2(DIV) && ok) {
    double loss = 0.0, aux = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
      const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
      const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
      const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
      float l = 0.0f, x = 0.0f;
#pragma omp simd reduction(+ : l, x)
      for (int i = 0; i < n; ++i)
        l += pass2_term<DIV>(log_q(zs[i] * sm, st), log_p(zt[i] * tm, st), mw, x);
      loss += l;
      aux += x;
    }
    div = loss;
    st.aux = (float)aux;
  }

  double hard_loss = 0.0;
  if (hard) {
    // CE = LSE(h z) - h z[label] = (m - h z[label]) + log d: no cancellation of large logits
    hard_loss = (double)(st.m_1 - load_as_float(srow, label, s_dtype) * hm) + (double)st.ld_1;
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
  const float cs = grad_scale * P.soft_scale * sm;  // d/dz = s_mul d/da
  const float ch = hard ? grad_scale * P.hard_weight * hm : 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    const float aux = st.aux, m1 = st.m_1, ld1 = st.ld_1;
    if (ch != 0.0f) {
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const float lq = log_q(zs[i] * sm, st);
        const float q1 = hard_sep ? fd_exp((zs[i] * hm - m1) - ld1) : fd_exp(lq);
        g[i] = cs * soft_grad<DIV>(lq, log_p(zt[i] * tm, st), mw, aux) + ch * q1;
      }
      if (label >= j0 && label < j0 + n) g[label - j0] -= ch;
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i)
        g[i] = cs * soft_grad<DIV>(log_q(zs[i] * sm, st), log_p(zt[i] * tm, st), mw, aux);
    }
    store_chunk(grow, s_dtype, j0, n, g);
  }
  zero_row(grow, s_dtype, V, grad_width);
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

#pragma omp parallel num_threads(nt)
  {
    alignas(64) float zs[kChunk];
    alignas(64) float zt[kChunk];
    alignas(64) float g[kChunk];
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
                                         &A.loss_rows[r], P, grad_scale, zs, zt, g);
      });
    }
  }
  return kOk;
}

}  // namespace FD_ISA
}  // namespace cpu
}  // namespace fastdistill
