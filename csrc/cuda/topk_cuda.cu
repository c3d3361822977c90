// Top-k (sparse teacher) distillation loss and student gradient on the GPU: the contract of
// csrc/cpu/topk_cpu.cpp (cpu::topk_rows), with the per-bin math of csrc/include/fastdistill/
// topk.h shared with it.
//
// One block of kThreads threads per row; the row's membership bitmask (V bits) lives in dynamic
// shared memory (at most 48 KB: V <= 393216, checked by the launcher and, with a clear error,
// by fastdistill/backends/_ext.py). Per row:
//   index phase  zero the bitmask; each thread sets the bits of its indices k = tid, tid +
//                kThreads, ... with atomicOr; an index outside [0, V) or a bit already set
//                rejects the row (loss NaN, gradient 0; no host synchronisation);
//   pass 1       (bucket, none; any tail with a hard loss) the student row streamed in units of
//                16 bytes (4 float32 / 8 16-bit columns, one bitmask word read per unit): the
//                online log-sum-exp of a = s_mul z over the columns outside the indices, and
//                of h_mul z for a hard loss with its own multiplier; merged across the block
//                by fixed shuffle trees (deterministic);
//   K phase      the K gathered logits merged into the full LSE, the bins' log-probabilities,
//                loss and aux = sum qh (topk.h), the gradient at each index into `work`
//                ([n_rows, K] float32, global memory: O(N K));
//   pass 2       the gradient row streamed (the same coefficient times exp(a_j - L_ref) for
//                every column outside the indices, plus the CE's softmax), then a barrier and
//                the K values from `work` written over their columns.
// HBM traffic per row (E_s bytes per student element, V columns, W grad width): pass 1 V E_s,
// pass 2 V E_s + W E_s, the teacher K (E_idx + E_lp), work 2 K 4. renormalize without a hard
// loss reads no student column outside the indices: W E_s written only.
//
// Aliasing: grad may be the student buffer. The K logits and the label's logit (hard loss) are
// read in the K phase, and a barrier separates it from pass 2; in pass 2 a thread reads each of
// its units before it writes the same unit; the K values written after the last barrier come
// from `work`.

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "fastdistill/dtype.h"
#include "fastdistill/topk.h"

#if defined(FD_CUDA_EMU)
#define FD_DYNAMIC_SHARED(T, name) T* name = emu::dynamic_shared<T>()
#else
#define FD_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxMaskBytes = 48 << 10;  // dynamic shared memory without an opt-in

// ---- online log-sum-exp as (max, shifted sum) ---------------------------------------------------

struct Lse {
  float m, d;
};

__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -fd_inf() ? 0.0f : fd_exp(m_old - m_new);
}

// the union of two streams; NaN in a sum propagates (a NaN input reaches d through exp)
__device__ __forceinline__ Lse lse_merge(Lse x, Lse y) {
  const float m = fmaxf(x.m, y.m);
  return Lse{m, x.d * rescale(x.m, m) + y.d * rescale(y.m, m)};
}

// adds the values v[0..n) (-inf: nothing) to x
template <int N>
__device__ __forceinline__ void lse_add(Lse& x, const float (&v)[N]) {
  float um = -fd_inf();
#pragma unroll
  for (int k = 0; k < N; ++k) um = fmaxf(um, v[k]);
  const float m = fmaxf(x.m, um);
  if (m != x.m) {
    x.d *= rescale(x.m, m);
    x.m = m;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) x.d += v[k] == -fd_inf() ? 0.0f : fd_exp(v[k] - m);
}

__device__ __forceinline__ Lse warp_lse(Lse x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Lse y{__shfl_down_sync(0xffffffffu, x.m, off), __shfl_down_sync(0xffffffffu, x.d, off)};
    x = lse_merge(x, y);
  }
  return x;
}

// The block's union of the two streams x[0], x[1], returned to every thread. sm: 2 * 2 *
// (kWarp + 1) floats; every thread of the block must call it.
__device__ __forceinline__ void block_lse2(Lse (&x)[2], float* sm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int i = 0; i < 2; ++i) x[i] = warp_lse(x[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sm[(warp * 2 + i) * 2] = x[i].m;
      sm[(warp * 2 + i) * 2 + 1] = x[i].d;
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      Lse y{-fd_inf(), 0.0f};
      if (lane < kWarps) y = Lse{sm[(lane * 2 + i) * 2], sm[(lane * 2 + i) * 2 + 1]};
      y = warp_lse(y);
      if (lane == 0) {
        sm[(kWarp * 2 + i) * 2] = y.m;
        sm[(kWarp * 2 + i) * 2 + 1] = y.d;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) x[i] = Lse{sm[(kWarp * 2 + i) * 2], sm[(kWarp * 2 + i) * 2 + 1]};
  __syncthreads();  // sm may be reused right away
}

// ---- element access ----------------------------------------------------------------------------

__device__ __forceinline__ int64_t load_index(const void* row, int32_t itype, int64_t k) {
  return itype == kInt32 ? int64_t(static_cast<const int32_t*>(row)[k])
                         : static_cast<const int64_t*>(row)[k];
}

template <int32_t DT>
__device__ __forceinline__ void store_one(void* row, int64_t j, float v) {
  if (DT == kFloat32)
    static_cast<float*>(row)[j] = v;
  else
    static_cast<uint16_t*>(row)[j] = to_bits16<DT>(v);
}

// Calls f(c, zs, member bits) for this thread's units with first column c < end (columns >= V
// are -inf and not read). The next unit's load is issued before f runs on the current one.
template <int32_t SD, typename F>
__device__ __forceinline__ void for_units(const void* srow, const uint32_t* mask, int end, int V,
                                          bool vec, F&& f) {
  constexpr int N = unit_cols<SD>(), kStep = kThreads * N;
  int c = int(threadIdx.x) * N;
  if (c >= end) return;
  Raw<N> r = load_raw<SD, N, false>(srow, c, V - c, vec);
  for (;;) {
    const int cn = c + kStep;
    const bool more = cn < end;
    Raw<N> nr;
    if (more) nr = load_raw<SD, N, false>(srow, cn, V - cn, vec);
    float zs[N];
    to_floats<SD>(r, V - c, -fd_inf(), zs);
    const uint32_t bits = c < V ? (mask[c >> 5] >> (c & 31)) : 0u;
    f(c, zs, bits);
    if (!more) break;
    r = nr;
    c = cn;
  }
}

// ---- the kernel: one block per row ------------------------------------------------------------

template <int32_t SD>
__global__ void __launch_bounds__(kThreads) topk_kernel(const TopkArgs A) {
  FD_DYNAMIC_SHARED(uint32_t, mask);
  __shared__ float sml[2 * 2 * (kWarp + 1)];
  __shared__ float sms[(kWarp + 1) * 4];
  constexpr int N = unit_cols<SD>();
  const TopkParams& P = A.params;
  const int64_t row = blockIdx.x;
  const int V = int(P.vocab), W = int(A.grad_width);
  const int64_t K = P.k;
  const int tid = int(threadIdx.x);
  const int64_t s_elt = elem_size(SD);
  const void* srow = static_cast<const char*>(A.student) + row * A.s_stride * s_elt;
  const void* irow = static_cast<const char*>(A.indices) +
                     row * A.i_stride * (A.i_dtype == kInt32 ? 4 : 8);
  const void* lrow = static_cast<const char*>(A.logprobs) + row * A.l_stride *
                     elem_size(A.l_dtype);
  void* grow = A.grad ? static_cast<char*>(A.grad) + row * A.g_stride * s_elt : nullptr;
  float* work = A.work + row * K;
  const bool vec_out = grow != nullptr && aligned16(grow);
  const bool vec = aligned16(srow);

  const bool has_label = A.labels != nullptr;
  const int64_t label = has_label ? A.labels[row] : 0;
  const bool hard = P.hard_weight != 0.0f && has_label;
  const bool ignored = has_label && label == P.ignore_index;
  if (ignored || (hard && (label < 0 || label >= V))) {
    if (tid == 0) A.loss_rows[row] = ignored ? 0.0f : fd_nan();
    if (grow) zero_row<SD>(grow, W, vec_out);
    return;
  }

  // ---- index phase ----
  const int words = (V + 31) >> 5;
  for (int w = tid; w < words; w += kThreads) mask[w] = 0u;
  __syncthreads();
  float cnt[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // rejected indices, bad logprobs, sum exp(lp)
  for (int64_t k = tid; k < K; k += kThreads) {
    const int64_t i = load_index(irow, A.i_dtype, k);
    bool bad = i < 0 || i >= V;
    if (!bad) {
      const uint32_t bit = 1u << (i & 31);
      bad = (atomicOr(&mask[i >> 5], bit) & bit) != 0u;
    }
    cnt[0] += bad ? 1.0f : 0.0f;
    const float l = load_as_float(lrow, k, A.l_dtype);
    cnt[1] += (l != l || l == fd_inf()) ? 1.0f : 0.0f;
    cnt[2] += fd_exp(l);
  }
  block_sum<4>(cnt, sms);  // its barriers also publish the bitmask
  if (cnt[0] != 0.0f) {
    if (tid == 0) A.loss_rows[row] = fd_nan();
    if (grow) zero_row<SD>(grow, W, vec_out);
    return;
  }
  const bool t_bad = cnt[1] != 0.0f;
  const float sm = P.s_mul, hm = P.h_mul;
  const int32_t tail = (P.tail == kTailBucket && K >= V) ? int32_t(kTailNone) : P.tail;
  const bool hard_sep = hard && hm != sm;
  const float ninf = -fd_inf();

  // ---- pass 1: LSE of a outside the indices, and of h z ----
  Lse st[2] = {{ninf, 0.0f}, {ninf, 0.0f}};  // outside, hard
  if (tail != kTailRenormalize || hard) {
    for_units<SD>(srow, mask, V, V, vec, [&](int, const float(&zs)[N], uint32_t bits) {
      float a[N];
#pragma unroll
      for (int k = 0; k < N; ++k) a[k] = ((bits >> k) & 1u) ? ninf : __fmul_rn(zs[k], sm);
      lse_add(st[0], a);
      if (hard_sep) {
#pragma unroll
        for (int k = 0; k < N; ++k) a[k] = __fmul_rn(zs[k], hm);
        lse_add(st[1], a);
      }
    });
  }
  block_lse2(st, sml);
  const Lse out = st[0], h1 = st[1];

  // ---- K phase: the LSE of the K logits (and of the logprobs, renormalize) ----
  Lse kin[2] = {{ninf, 0.0f}, {ninf, 0.0f}};
  for (int64_t k = tid; k < K; k += kThreads) {
    float v[1] = {__fmul_rn(load_as_float(srow, load_index(irow, A.i_dtype, k), SD), sm)};
    lse_add(kin[0], v);
    v[0] = load_as_float(lrow, k, A.l_dtype);
    lse_add(kin[1], v);
  }
  block_lse2(kin, sml);
  const Lse in = kin[0], tl = kin[1];
  // the full LSE of a: (m, ld)
  float m = fmaxf(out.m, in.m), ld = ninf;
  bool ok;
  if (tail == kTailRenormalize && !hard) {
    ok = true;
  } else {
    const float d = out.d * rescale(out.m, m) + in.d * rescale(in.m, m);
    ld = logf(d);
    ok = m > ninf && m < fd_inf() && d > 0.0f && d < fd_inf();
    m = ok ? m : 0.0f;
  }
  float lq_off, lp_off;  // lq_k = (a_k - lq_off) - ..., see below
  float lq_ld, lp_ld;
  if (tail == kTailRenormalize) {
    lq_off = in.m;
    lq_ld = logf(in.d);
    lp_off = tl.m;
    lp_ld = logf(tl.d);
    ok = (!hard || ok) && in.m > ninf && in.m < fd_inf() && in.d > 0.0f && in.d < fd_inf() &&
         tl.m > ninf && tl.d > 0.0f && tl.d < fd_inf();
  } else {
    lq_off = m;
    lq_ld = ld;
    lp_off = 0.0f;
    lp_ld = 0.0f;
  }
  ok = ok && !t_bad;
  const bool has_tail = tail == kTailBucket;
  const float lq_tail = has_tail && out.d > 0.0f ? (out.m - m) + (logf(out.d) - ld) : ninf;
  const float p_tail = 1.0f - cnt[2];
  const float lp_tail = p_tail > 0.0f ? logf(p_tail) : ninf;
  // loss and aux over the bins
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // loss, aux (block_sum<4> shares sms)
  for (int64_t k = tid; k < K; k += kThreads) {
    const float a = __fmul_rn(load_as_float(srow, load_index(irow, A.i_dtype, k), SD), sm);
    const float lq = (a - lq_off) - lq_ld;
    const float lp = (load_as_float(lrow, k, A.l_dtype) - lp_off) - lp_ld;
    float l, qh;
    topk::bin_terms<float>(P.divergence, P.beta, lp, lq, l, qh);
    acc[0] += l;
    acc[1] += qh;
  }
  float qh_tail = 0.0f;  // every thread knows the tail bin; thread 0 adds it
  if (has_tail) {
    float l;
    topk::bin_terms<float>(P.divergence, P.beta, lp_tail, lq_tail, l, qh_tail);
    if (tid == 0) {
      acc[0] += l;
      acc[1] += qh_tail;
    }
  }
  block_sum<4>(acc, sms);
  const float div = acc[0], aux = acc[1];
  const float m1 = hard_sep ? h1.m : m;
  const float ld1 = hard_sep ? logf(h1.d) : ld;
  if (hard_sep) ok = ok && h1.m > ninf && h1.m < fd_inf() && h1.d > 0.0f && h1.d < fd_inf();
  if (tid == 0) {
    // CE = LSE(h z) - h z[label] = (m1 - h z[label]) + ld1
    const double hard_loss =
        hard ? double(m1 - __fmul_rn(load_as_float(srow, label, SD), hm)) + double(ld1) : 0.0;
    A.loss_rows[row] =
        ok ? float(double(P.soft_scale) * double(div) + double(P.hard_weight) * hard_loss)
           : fd_nan();
  }
  if (!grow) return;

  // ---- the gradient at the indices, into work ----
  const bool nan_row = !ok || !(aux > ninf && aux < fd_inf());
  const float gs = *A.grad_scale;
  const float cs = gs * P.soft_scale * sm;
  const float ch = hard ? gs * P.hard_weight * hm : 0.0f;
  for (int64_t k = tid; k < K; k += kThreads) {
    const int64_t i = load_index(irow, A.i_dtype, k);
    const float z = load_as_float(srow, i, SD);
    const float lq = (__fmul_rn(z, sm) - lq_off) - lq_ld;
    const float lp = (load_as_float(lrow, k, A.l_dtype) - lp_off) - lp_ld;
    float l, qh;
    topk::bin_terms<float>(P.divergence, P.beta, lp, lq, l, qh);
    float g = cs * (qh - aux * fd_exp(lq));
    if (hard) g += ch * (fd_exp((__fmul_rn(z, hm) - m1) - ld1) - (i == label ? 1.0f : 0.0f));
    work[k] = nan_row ? fd_nan() : g;
  }
  // grad may be the student: every read of the K logits and of the label's logit (thread 0,
  // above) is done before any thread writes a gradient
  __syncthreads();
  // ---- pass 2: C exp(a_j - (m_ref + ld_ref)) outside the indices (+ the CE's softmax) ----
  float c = 0.0f, m_ref = m, ld_ref = ld;
  if (has_tail) {
    const bool some = out.d > 0.0f;
    const float qt = fd_exp(lq_tail);
    c = some ? cs * (qh_tail - aux * qt) + (hard && !hard_sep ? ch * qt : 0.0f) : 0.0f;
    m_ref = some ? out.m : 0.0f;
    ld_ref = some ? logf(out.d) : 0.0f;
  } else if (tail == kTailNone) {
    c = -cs * aux + (hard && !hard_sep ? ch : 0.0f);
  } else {
    c = hard && !hard_sep ? ch : 0.0f;
  }
  if (!(m_ref + ld_ref > ninf && m_ref + ld_ref < fd_inf())) m_ref = ld_ref = 0.0f;
  const int lab = hard ? int(label) : -1;
  if (c == 0.0f && !hard_sep && !nan_row) {
    // nothing outside the indices depends on the student (renormalize): zeros, no reads
    zero_row<SD>(grow, W, vec_out);
    if (hard) {
      __syncthreads();
      if (tid == 0) store_one<SD>(grow, lab, -ch);
    }
  } else {
    for_units<SD>(srow, mask, W, V, vec, [&](int col, const float(&zs)[N], uint32_t) {
      float g[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float v = c != 0.0f ? c * fd_exp((__fmul_rn(zs[k], sm) - m_ref) - ld_ref) : 0.0f;
        if (hard_sep) v += ch * fd_exp((__fmul_rn(zs[k], hm) - m1) - ld1);
        if (col + k == lab) v -= ch;
        v = nan_row ? fd_nan() : v;
        g[k] = col + k < V ? v : 0.0f;
      }
      store_unit<SD>(grow, col, W - col, vec_out, g);
    });
  }
  __syncthreads();  // every column written before the K values go over theirs
  for (int64_t k = tid; k < K; k += kThreads)
    store_one<SD>(grow, load_index(irow, A.i_dtype, k), work[k]);
}

template <int32_t SD>
void launch(const TopkArgs& A, size_t smem, cudaStream_t stream) {
  topk_kernel<SD><<<dim3(static_cast<unsigned int>(A.n_rows)), kThreads, smem, stream>>>(A);
}

}  // namespace

int32_t topk_rows(const TopkArgs& A) {
  const TopkParams& P = A.params;
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.l_dtype < 0 || A.l_dtype > 2 || A.i_dtype < 0 ||
      A.i_dtype > 1)
    return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;
  const int64_t words = (P.vocab + 31) / 32;
  if (P.vocab <= 0 || P.k <= 0 || A.n_rows < 0 || A.n_rows > kMaxRows || !A.student ||
      !A.indices || !A.logprobs || !A.loss_rows ||
      (A.grad && (A.grad_width < P.vocab || A.grad_width > kMaxCols || !A.grad_scale ||
                  !A.work)) ||
      P.vocab > kMaxCols || words * 4 > kMaxMaskBytes || P.divergence < 0 ||
      P.divergence > topk::kSKL || P.tail < 0 || P.tail > kTailRenormalize)
    return kBadArgument;
  const size_t smem = size_t((words + 3) / 4 * 16);
  cudaStream_t s = static_cast<cudaStream_t>(A.stream);
  switch (A.s_dtype) {
    case kFloat32: launch<kFloat32>(A, smem, s); break;
    case kFloat16: launch<kFloat16>(A, smem, s); break;
    default: launch<kBFloat16>(A, smem, s); break;
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace fastdistill
