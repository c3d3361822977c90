// Top-k (sparse teacher) distillation loss and student gradient on the host: the contract of
// TopkArgs (csrc/include/fastdistill/args.h), the per-bin math of topk.h.
//
// One OpenMP thread per row at a time. Per row:
//   index phase   the K indices into a per-thread bitmask of V bits (out of range or already
//                 set: the row is rejected: loss NaN, gradient 0), then the K student logits and
//                 teacher logprobs gathered into per-thread buffers (before any gradient is
//                 written: grad may alias the student);
//   pass 1        (bucket, none; or any tail with a hard loss) the student row streamed in
//                 chunks of kChunk columns: the log-sum-exp of a = s_mul z over the columns
//                 OUTSIDE the indices (a copy of the chunk with its members set to -inf, found by
//                 walking the sorted indices), so the tail mass exp(LSE_out - LSE) is never
//                 formed as 1 - sum q (which cancels when the indices hold most of the mass);
//                 the full LSE follows exactly by merging in the K gathered logits; the hard
//                 loss's own LSE of h_mul z when h_mul != s_mul;
//   K phase       the bins' log-probabilities in double, their terms (topk.h) in float summed
//                 in double: the loss and aux = sum qh; the gradient at the indices;
//   pass 2        the gradient streamed: C exp(a_j - L_ref) (+ the CE's softmax), the same
//                 coefficient for every column outside the indices, then the K indices written
//                 over it.
// Reads of the student: 2 passes (renormalize without a hard loss: the K logits only, and the
// gradient row written without reading it); the teacher: O(K). Extra memory per thread: V / 8
// bytes of bitmask and a few K-sized buffers. Sums over a chunk in float, across chunks and over
// K in double, in a fixed order: bitwise reproducible for a given ISA variant.
//
// Compiled once per ISA level with -DFD_ISA=<namespace> (see setup.py).

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "fastdistill/dtype.h"
#include "fastdistill/topk.h"

#ifndef FD_ISA
#define FD_ISA base
#endif

namespace fastdistill {
namespace cpu {
namespace FD_ISA {
namespace {

constexpr int kChunk = 1024;

const float* load_chunk(const void* row, int32_t dtype, int64_t j0, int n, float* __restrict buf) {
  if (dtype == kFloat32) return static_cast<const float*>(row) + j0;
  const uint16_t* p = static_cast<const uint16_t*>(row) + j0;
  if (dtype == kBFloat16) {
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = bf16_to_float(p[i]);
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = fp16_to_float(p[i]);
  }
  return buf;
}

void store_chunk(void* row, int32_t dtype, int64_t j0, int n, const float* __restrict in) {
  if (dtype == kFloat32) {
    std::memcpy(static_cast<float*>(row) + j0, in, sizeof(float) * n);
    return;
  }
  uint16_t* p = static_cast<uint16_t*>(row) + j0;
  if (dtype == kBFloat16) {
#pragma omp simd
    for (int i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]);
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) p[i] = float_to_fp16(in[i]);
  }
}

void zero_row(void* row, int32_t dtype, int64_t j0, int64_t j1) {
  if (j1 <= j0) return;
  const size_t elt = dtype == kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(row) + j0 * elt, 0, (j1 - j0) * elt);
}

int64_t load_index(const void* row, int32_t itype, int64_t k) {
  return itype == kInt32 ? int64_t(static_cast<const int32_t*>(row)[k])
                         : static_cast<const int64_t*>(row)[k];
}

// An online log-sum-exp kept as (max, shifted sum): chunks are added with their own maxima.
struct Lse {
  float m = -fd_inf();
  double d = 0.0;
  void add(float cm, float s) {  // a chunk with maximum cm and sum s of e^{x - cm}
    if (cm == -fd_inf() && !(s != s)) return;
    const float mn = cm > m ? cm : m;
    const double fo = m == -fd_inf() ? 0.0 : std::exp(double(m) - double(mn));
    const double fc = cm == -fd_inf() ? 0.0 : std::exp(double(cm) - double(mn));
    d = d * fo + double(s) * fc;
    m = mn;
  }
};

// max and sum of e^{x - max} over one chunk of x; -inf entries add nothing, NaN reaches the sum.
void chunk_lse(const float* __restrict x, int n, float& cm, float& s) {
  float m = -fd_inf();
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += x[i] == -fd_inf() ? 0.0f : fd_exp(x[i] - m);
  cm = m;
  s = acc;
}

struct Scratch {
  std::vector<uint64_t> bits;  // V bits, all zero between rows
  std::vector<int64_t> idx, sorted;  // the row's indices as given, and in increasing order
  std::vector<float> zk, lpk;  // student logit and teacher logprob at each index
  std::vector<double> lq, lp;  // the bins' log-probabilities (K + 1)
  std::vector<double> qh;      // q dD/dq of each bin
  std::vector<float> gk;       // the gradient at each index
  alignas(64) float buf[kChunk];
  alignas(64) float x[kChunk];
  alignas(64) float g[kChunk];
};

void reject(const TopkArgs& A, float* loss, void* grow, float value) {
  *loss = value;
  if (grow) zero_row(grow, A.s_dtype, 0, A.grad_width);
}

void topk_row(const TopkArgs& A, int64_t r, float grad_scale, Scratch& S) {
  const TopkParams& P = A.params;
  const int64_t V = P.vocab, K = P.k, W = A.grad_width;
  const size_t s_elt = A.s_dtype == kFloat32 ? 4 : 2, l_elt = A.l_dtype == kFloat32 ? 4 : 2;
  const void* srow = static_cast<const char*>(A.student) + size_t(r) * A.s_stride * s_elt;
  const void* irow = static_cast<const char*>(A.indices) +
                     size_t(r) * A.i_stride * (A.i_dtype == kInt32 ? 4 : 8);
  const void* lrow = static_cast<const char*>(A.logprobs) + size_t(r) * A.l_stride * l_elt;
  void* grow = A.grad ? static_cast<char*>(A.grad) + size_t(r) * A.g_stride * s_elt : nullptr;
  float* loss_out = &A.loss_rows[r];
  const int64_t label = A.labels ? A.labels[r] : 0;
  if (A.labels && label == P.ignore_index) return reject(A, loss_out, grow, 0.0f);
  const bool hard = P.hard_weight != 0.0f && A.labels != nullptr;
  if (hard && (label < 0 || label >= V)) return reject(A, loss_out, grow, fd_nan());

  // ---- index phase: bitmask, range and repetition checks ----
  uint64_t* bits = S.bits.data();
  bool bad = false;
  int64_t set = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = load_index(irow, A.i_dtype, k);
    if (i < 0 || i >= V) {
      bad = true;
      break;
    }
    const uint64_t bit = uint64_t(1) << (i & 63);
    if (bits[i >> 6] & bit) {
      bad = true;
      break;
    }
    bits[i >> 6] |= bit;
    S.idx[set++] = i;
  }
  auto clear = [&] {
    for (int64_t k = 0; k < set; ++k) bits[S.idx[k] >> 6] = 0;
  };
  if (bad) {
    clear();
    return reject(A, loss_out, grow, fd_nan());
  }
  const float sm = P.s_mul, hm = P.h_mul;
  for (int64_t k = 0; k < K; ++k) {
    S.zk[k] = load_as_float(srow, S.idx[k], A.s_dtype);
    S.lpk[k] = load_as_float(lrow, k, A.l_dtype);
  }
  const int32_t tail = (P.tail == kTailBucket && K >= V) ? int32_t(kTailNone) : P.tail;
  const bool hard_sep = hard && hm != sm;

  // ---- pass 1: LSE of a outside the indices (and of h z for the hard loss) ----
  const bool pass1 = tail != kTailRenormalize || hard;
  Lse out, h1;
  if (pass1) {
    // the indices in increasing order: each chunk sets its members to -inf in a copy of a
    std::copy(S.idx.begin(), S.idx.begin() + K, S.sorted.begin());
    std::sort(S.sorted.begin(), S.sorted.begin() + K);
    int64_t next = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
      const int n = int(V - j0 < kChunk ? V - j0 : kChunk);
      const float* __restrict z = load_chunk(srow, A.s_dtype, j0, n, S.buf);
      float* __restrict x = S.x;
      float cm, s;
      if (hard_sep) {
#pragma omp simd
        for (int i = 0; i < n; ++i) x[i] = z[i] * hm;
        chunk_lse(x, n, cm, s);
        h1.add(cm, s);
      }
#pragma omp simd
      for (int i = 0; i < n; ++i) x[i] = z[i] * sm;
      for (; next < K && S.sorted[next] < j0 + n; ++next) x[S.sorted[next] - j0] = -fd_inf();
      chunk_lse(x, n, cm, s);
      out.add(cm, s);
    }
  }

  // ---- K phase ----
  const double ninf = -double(fd_inf());
  double m_in = ninf;
  bool t_bad = false;
  for (int64_t k = 0; k < K; ++k) {
    const double a = double(S.zk[k] * sm);
    m_in = a > m_in ? a : m_in;
    const float l = S.lpk[k];
    t_bad |= (l != l) || l == fd_inf();
  }
  const double ms_in = std::isfinite(m_in) ? m_in : 0.0;
  double d_in = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double a = double(S.zk[k] * sm);
    d_in += a == ninf ? 0.0 : std::exp(a - ms_in);
  }
  // full LSE of a = (m, ld): the streamed outside part merged with the K gathered logits
  double m = ninf, ld = ninf;
  bool ok = false;
  if (pass1) {
    const double mo = out.m;
    m = mo > m_in ? mo : m_in;
    const double msafe = std::isfinite(m) ? m : 0.0;
    const double d = (mo == ninf ? 0.0 : out.d * std::exp(mo - msafe)) +
                     (m_in == ninf ? 0.0 : d_in * std::exp(m_in - msafe));
    ld = std::log(d);
    ok = std::isfinite(m) && d > 0.0 && std::isfinite(d);
    m = msafe;
  }
  const int64_t B = tail == kTailBucket ? K + 1 : K;
  double qtail = 0.0;  // the student's mass outside the indices (bucket)
  if (tail == kTailRenormalize) {
    double ml = ninf;
    for (int64_t k = 0; k < K; ++k) ml = double(S.lpk[k]) > ml ? double(S.lpk[k]) : ml;
    const double mls = std::isfinite(ml) ? ml : 0.0;
    double dl = 0.0;
    for (int64_t k = 0; k < K; ++k) dl += std::exp(double(S.lpk[k]) - mls);
    const double ldl = std::log(dl), ldi = std::log(d_in);
    for (int64_t k = 0; k < K; ++k) {
      S.lq[k] = (double(S.zk[k] * sm) - ms_in) - ldi;
      S.lp[k] = (double(S.lpk[k]) - mls) - ldl;
    }
    ok = std::isfinite(m_in) && d_in > 0.0 && std::isfinite(d_in) && dl > 0.0 &&
         std::isfinite(dl) && (!hard || ok);
  } else {
    double sp = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      S.lq[k] = (double(S.zk[k] * sm) - m) - ld;
      S.lp[k] = double(S.lpk[k]);
      sp += std::exp(double(S.lpk[k]));
    }
    if (tail == kTailBucket) {
      S.lq[K] = out.d > 0.0 ? (double(out.m) - m) + (std::log(out.d) - ld) : ninf;
      const double pt = 1.0 - sp;
      S.lp[K] = pt > 0.0 ? std::log(pt) : ninf;
      qtail = std::exp(S.lq[K]);
    }
  }
  ok = ok && !t_bad;
  double div = 0.0, aux = 0.0, qh_tail = 0.0;
  // the bins' terms in float (the vectorisable exp / log of fast_math.h, as on the device),
  // summed in double
  for (int64_t b = 0; b < B; ++b) {
    float l, qh;
    topk::bin_terms<float>(P.divergence, P.beta, float(S.lp[b]), float(S.lq[b]), l, qh);
    div += l;
    aux += qh;
    S.qh[b] = qh;
    if (b == K) qh_tail = qh;
  }
  // the hard loss: CE = LSE(h z) - h z[label] = (m1 - h z[label]) + ld1
  double m1 = m, ld1 = ld;
  if (hard_sep) {
    m1 = h1.m;
    ld1 = std::log(h1.d);
    ok = ok && std::isfinite(m1) && h1.d > 0.0 && std::isfinite(h1.d);
  }
  double hard_loss = 0.0;
  if (hard) hard_loss = (m1 - double(load_as_float(srow, label, A.s_dtype) * hm)) + ld1;
  *loss_out = ok ? float(double(P.soft_scale) * div + double(P.hard_weight) * hard_loss)
                 : fd_nan();

  // ---- pass 2: the gradient ----
  if (!grow) return clear();
  const bool nan_row = !ok || !std::isfinite(aux);
  const double cs = double(grad_scale) * P.soft_scale * sm;
  const double ch = hard ? double(grad_scale) * P.hard_weight * hm : 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double q = fd_exp(float(S.lq[k]));
    double g = cs * (S.qh[k] - aux * q);
    if (hard) {
      const double q1 = fd_exp(float((double(S.zk[k] * hm) - m1) - ld1));
      g += ch * (q1 - (S.idx[k] == label ? 1.0 : 0.0));
    }
    S.gk[k] = nan_row ? fd_nan() : float(g);
  }
  // one coefficient for every column outside the indices: C exp(a_j - (m_ref + ld_ref))
  double c = 0.0, m_ref = m, ld_ref = ld;
  if (tail == kTailBucket) {
    m_ref = out.m;
    ld_ref = std::log(out.d);
    c = out.d > 0.0 ? cs * (qh_tail - aux * qtail) : 0.0;
    if (hard && !hard_sep && out.d > 0.0) c += ch * qtail;
    if (!(out.d > 0.0)) m_ref = ld_ref = 0.0;
  } else if (tail == kTailNone) {
    c = -cs * aux + (hard && !hard_sep ? ch : 0.0);
  } else {
    c = hard && !hard_sep ? ch : 0.0;
  }
  if (!std::isfinite(m_ref + ld_ref)) m_ref = ld_ref = 0.0;
  const float cf = float(c), mr = float(m_ref), lr = float(ld_ref);
  const float chf = float(ch), m1f = float(m1), ld1f = float(ld1);
  const bool reads = cf != 0.0f || hard_sep || nan_row;
  for (int64_t j0 = 0; j0 < V; j0 += kChunk) {
    const int n = int(V - j0 < kChunk ? V - j0 : kChunk);
    float* __restrict g = S.g;
    if (nan_row) {
      for (int i = 0; i < n; ++i) g[i] = fd_nan();
    } else if (!reads) {
      for (int i = 0; i < n; ++i) g[i] = 0.0f;
    } else {
      const float* __restrict z = load_chunk(srow, A.s_dtype, j0, n, S.buf);
      if (hard_sep) {
#pragma omp simd
        for (int i = 0; i < n; ++i)
          g[i] = (cf != 0.0f ? cf * fd_exp((z[i] * sm - mr) - lr) : 0.0f) +
                 chf * fd_exp((z[i] * hm - m1f) - ld1f);
      } else {
#pragma omp simd
        for (int i = 0; i < n; ++i) g[i] = cf * fd_exp((z[i] * sm - mr) - lr);
      }
    }
    if (hard && !nan_row && label >= j0 && label < j0 + n) g[label - j0] -= chf;
    store_chunk(grow, A.s_dtype, j0, n, g);
  }
  zero_row(grow, A.s_dtype, V, W);
  for (int64_t k = 0; k < K; ++k) store_chunk(grow, A.s_dtype, S.idx[k], 1, &S.gk[k]);
  clear();
}

}  // namespace

int32_t topk_rows(const TopkArgs& A) {
  const TopkParams& P = A.params;
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.l_dtype < 0 || A.l_dtype > 2 || A.i_dtype < 0 ||
      A.i_dtype > 1)
    return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;
  if (P.vocab <= 0 || P.k <= 0 || A.n_rows < 0 || !A.student || !A.indices || !A.logprobs ||
      !A.loss_rows || (A.grad && (A.grad_width < P.vocab || !A.grad_scale)) ||
      P.divergence < 0 || P.divergence > topk::kSKL || P.tail < 0 || P.tail > kTailRenormalize)
    return kBadArgument;
  const int nt = A.num_threads > 0 ? A.num_threads : 1;
  const float grad_scale = A.grad ? *A.grad_scale : 0.0f;
#pragma omp parallel num_threads(nt)
  {
    Scratch S;
    S.bits.assign(size_t((P.vocab + 63) / 64), 0);
    S.idx.resize(size_t(P.k));
    S.sorted.resize(size_t(P.k));
    S.zk.resize(size_t(P.k));
    S.lpk.resize(size_t(P.k));
    S.lq.resize(size_t(P.k) + 1);
    S.lp.resize(size_t(P.k) + 1);
    S.qh.resize(size_t(P.k) + 1);
    S.gk.resize(size_t(P.k));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < A.n_rows; ++r) topk_row(A, r, grad_scale, S);
  }
  return kOk;
}

}  // namespace FD_ISA
}  // namespace cpu
}  // namespace fastdistill
