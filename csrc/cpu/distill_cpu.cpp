// Logit-level distillation loss and student gradient on the host.
//
// One OpenMP thread per row at a time; each row is streamed in chunks of kChunk columns that are
// converted to float32 in L1-resident buffers, and the math of csrc/include/fastdistill/
// divergence.h runs in `#pragma omp simd` loops (polynomial exp/log, so they vectorise).
//
// Passes over a row (reads of both inputs, writes of the gradient):
//   forward_kl, reverse_kl:  pass 1 (online LSEs + divergence), pass 3 (gradient): 2 reads, 1 write
//   jsd, skew_*, tvd:        pass 1, pass 2 (loss and aux), pass 3:                3 reads, 1 write
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
void chunk_max2(const float* __restrict x, const float* __restrict y, int n, float scale,
                float& mx, float& my) {
  float a = -fd_inf(), b = -fd_inf();
#pragma omp simd reduction(max : a, b)
  for (int i = 0; i < n; ++i) {
    const float u = x[i] * scale, v = y[i] * scale;
    a = u > a ? u : a;
    b = v > b ? v : b;
  }
  mx = a;
  my = b;
}

// Plain online log-sum-exp (the hard loss at T = 1 when T != 1).
struct OnlineLSE {
  float m = -fd_inf();
  double d = 0.0;
  void add(const float* __restrict z, int n) {
    const float cm = chunk_max(z, n, 1.0f);
    if (cm == -fd_inf()) return;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; ++i) s += fd_exp(z[i] - cm);
    const float m_new = cm > m ? cm : m;
    d = d * (double)rescale_factor(m, m_new) + (double)s * (double)rescale_factor(cm, m_new);
    m = m_new;
  }
};

template <int32_t DIV>
void row_kernel(const void* srow, int32_t s_dtype, const void* trow, int32_t t_dtype, int64_t label,
                bool has_label, void* grow, int64_t grad_width, float* loss_out,
                const DistillParams& P, float grad_scale, float* __restrict bs,
                float* __restrict bt, float* __restrict g) {
  const int64_t V = P.vocab;
  const float it = P.inv_temperature;
  const bool hard = P.hard_weight != 0.0f && has_label;
  const bool t_is_1 = it == 1.0f;
  const bool hard_sep = hard && !t_is_1;  // CE needs its own LSE at T = 1
  if (hard && (label < 0 || label >= V)) {  // the Python side rejects these for CPU tensors
    *loss_out = fd_nan();
    if (grow) zero_row(grow, s_dtype, 0, grad_width);
    return;
  }

  // ---- pass 1: online statistics of a = zs/T and b = zt/T (and of zs for the hard loss) ----
  Online<double> row = online_empty<double>();
  OnlineLSE o1;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    // the chunk's own statistics, relative to its maxima, then merged into the row's
    float cms, cmt;
    chunk_max2(zs, zt, n, it, cms, cmt);
    float ds = 0.0f, dt = 0.0f, w = 0.0f;
#pragma omp simd reduction(+ : ds, dt, w)
    for (int i = 0; i < n; ++i) {
      const float a = zs[i] * it, b = zt[i] * it;
      const float es = a == -fd_inf() ? 0.0f : fd_exp(a - cms);
      const float et = b == -fd_inf() ? 0.0f : fd_exp(b - cmt);
      ds += es;
      dt += et;
      if (DIV == kForwardKL || DIV == kReverseKL) w += w_term<DIV>(a, b, cms, cmt, es, et);
    }
    online_merge<DIV>(row, Online<double>{cms, cmt, ds, dt, w});
    if (hard_sep) o1.add(zs, n);
  }
  RowStats st;
  st.m_s = row.m_s;
  st.ld_s = (float)std::log(row.d_s);
  st.m_t = row.m_t;
  st.ld_t = (float)std::log(row.d_t);
  st.m_1 = hard_sep ? o1.m : st.m_s;
  st.ld_1 = hard_sep ? (float)std::log(o1.d) : st.ld_s;
  st.aux = 0.0f;
  double div = 0.0;
  if (DIV == kForwardKL || DIV == kReverseKL) div = online_kl<DIV>(row);
  if (DIV == kReverseKL) st.aux = (float)div;

  // ---- pass 2: loss and aux for the mixture / tvd divergences ----
  if (needs_pass2(DIV)) {
    double loss = 0.0, aux = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
      const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
      const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
      const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
      float l = 0.0f, x = 0.0f;
      const float beta = P.beta;
#pragma omp simd reduction(+ : l, x)
      for (int i = 0; i < n; ++i)
        l += pass2_term<DIV>(log_q(zs[i] * it, st), log_p(zt[i] * it, st), beta, x);
      loss += l;
      aux += x;
    }
    div = loss;
    st.aux = (float)aux;
  }

  double hard_loss = 0.0;
  if (hard) {
    // CE = LSE(z) - z[label] = (m - z[label]) + log d: no cancellation of large logits
    hard_loss = (double)(st.m_1 - load_as_float(srow, label, s_dtype)) + (double)st.ld_1;
  }
  *loss_out = (float)((double)P.soft_scale * div + (double)P.hard_weight * hard_loss);

  // ---- pass 3: gradient ----
  if (!grow) return;
  const float cs = grad_scale * P.soft_scale * it;  // d/dz = d/da / T
  const float ch = hard ? grad_scale * P.hard_weight : 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = (int)(V - j0 < kChunk ? V - j0 : kChunk);
    const float* __restrict zs = load_chunk(srow, s_dtype, j0, n, bs);
    const float* __restrict zt = load_chunk(trow, t_dtype, j0, n, bt);
    const float beta = P.beta, aux = st.aux, m1 = st.m_1, ld1 = st.ld_1;
    if (ch != 0.0f) {
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const float lq = log_q(zs[i] * it, st);
        const float q1 = t_is_1 ? fd_exp(lq) : fd_exp((zs[i] - m1) - ld1);
        g[i] = cs * soft_grad<DIV>(lq, log_p(zt[i] * it, st), beta, aux) + ch * q1;
      }
      if (label >= j0 && label < j0 + n) g[label - j0] -= ch;
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i)
        g[i] = cs * soft_grad<DIV>(log_q(zs[i] * it, st), log_p(zt[i] * it, st), beta, aux);
    }
    store_chunk(grow, s_dtype, j0, n, g);
  }
  zero_row(grow, s_dtype, V, grad_width);
}

}  // namespace

int32_t distill_rows(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                     int32_t t_dtype, int64_t t_stride, const int64_t* labels, void* grad,
                     int64_t g_stride, int64_t grad_width, float* loss_rows, int64_t n_rows,
                     const DistillParams& params, float grad_scale, int32_t num_threads) {
  if (s_dtype < 0 || s_dtype > 2 || t_dtype < 0 || t_dtype > 2) return kUnsupportedDType;
  if (params.vocab <= 0 || n_rows < 0 || (grad && grad_width < params.vocab)) return kBadArgument;
  const size_t s_elt = s_dtype == kFloat32 ? 4 : 2, t_elt = t_dtype == kFloat32 ? 4 : 2;
  const int nt = num_threads > 0 ? num_threads : 1;

#pragma omp parallel num_threads(nt)
  {
    alignas(64) float zs[kChunk];
    alignas(64) float zt[kChunk];
    alignas(64) float g[kChunk];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
      const void* srow = static_cast<const char*>(student) + (size_t)r * s_stride * s_elt;
      const void* trow = static_cast<const char*>(teacher) + (size_t)r * t_stride * t_elt;
      void* grow = grad ? static_cast<char*>(grad) + (size_t)r * g_stride * s_elt : nullptr;
      const int64_t label = labels ? labels[r] : 0;
      if (labels && label == params.ignore_index) {
        loss_rows[r] = 0.0f;
        if (grow) zero_row(grow, s_dtype, 0, grad_width);
        continue;
      }
      dispatch_divergence(params.divergence, [&](auto tag) {
        row_kernel<decltype(tag)::value>(srow, s_dtype, trow, t_dtype, label, labels != nullptr,
                                         grow, grad_width, &loss_rows[r], params, grad_scale, zs,
                                         zt, g);
      });
    }
  }
  return kOk;
}

}  // namespace FD_ISA
}  // namespace cpu
}  // namespace fastdistill
