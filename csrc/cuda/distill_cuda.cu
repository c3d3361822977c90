// Logit-level distillation loss and student gradient on the GPU: the contract of
// csrc/cpu/distill_cpu.cpp (cpu::distill_rows), with the per-element math of
// csrc/include/fastdistill/divergence.h shared with it; only indexing and reductions live here.
//
// One block of kThreads threads per row. Thread `tid` owns the units (N = 4 columns for float32
// students, 8 for 16-bit ones: one 16-byte vector of the student) tid, tid + kThreads, ... of the
// row (see common.cuh): 16-byte loads coalesced across the warp, scalar loads for misaligned rows
// and the partial last unit, with the same values for the same threads either way. While a unit
// is being computed, the loads of the thread's next unit are in flight. One kernel per (student
// dtype, divergence); the teacher dtype is a warp-uniform branch at load and conversion. All
// math is float32; reductions are fixed shuffle trees (deterministic, no atomics).
//
// Passes over a row and HBM traffic per row (E = bytes per element, V columns, W = grad width):
//   forward_kl, reverse_kl,  pass 1: online LSEs + divergence       V (E_s + E_t)
//   symmetric_kl
//                            pass 3: gradient                        V (E_s + E_t) + W E_s
//                            = 2 reads of s and t + 1 write of g
//   jsd, skew_*, tvd         pass 1: LSEs; pass 2: loss, aux = sum q h; pass 3: gradient
//                            = 3 reads of s and t + 1 write of g
//   loss only (no grad)      pass 3 skipped: one read pass fewer, no write
//   ignored row / bad label  W E_s (zeros written; s and t are not read)
// A row of V = 128k bf16 logits is 512 KB for s and t together, and a GPU holds hundreds of rows
// in flight, so the later passes come from HBM, not L2.
//
// Pass 1 keeps, per thread, the Online state of divergence.h relative to its running maxima; a
// new maximum of a group of 4 columns shifts the state once (rare after the first units), then
// the terms are added. States are merged across the warp with shuffles and across warps through
// shared memory (online_merge). The hard-label CE with its own multiplier (h_mul != s_mul) sums
// e^{h z_s - m1} alongside, with m1 = m_s h_mul / s_mul derived from the student maximum.
//
// Registers (ptxas, sm_90 / sm_80): 47-75 per thread, no spills (tests/test_cuda_build.py keeps
// every kernel free of local memory and the distill kernels within 80, i.e. 3 blocks per SM).
//
// Aliasing: grad may be the student buffer. A thread reads each of its units (pass 3) before it
// writes the same unit, and no other thread touches those columns; z_s[label] is read by the
// thread that owns the label's column, before its pass 3.

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "fastdistill/divergence.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
static_assert(kThreads % kWarp == 0, "block reductions assume whole warps");


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

// ---- pass 1 state ---------------------------------------------------------------------------------
// The divergence statistics, and for a hard loss with its own multiplier the shifted sum d1 of
// e^{h z_s - m1}. Its shift is derived from the student maximum, m1 = m_s k1 with k1 = h_mul /
// s_mul (within an ulp or two of max h z_s, which is all a log-sum-exp shift needs), so it needs
// no maximum of its own.

struct Pass1 {
  Online<float> o;
  float d1;
};

// Floats a state travels as through shuffles and shared memory: only what DIV uses.
template <int32_t DIV>
constexpr int pass1_floats() {
  return 5 + int(uses_wf(DIV)) + int(uses_wr(DIV));
}

// Moves a state to the larger maxima (ms, mt) without adding anything: the x-half of
// online_merge. d1 follows the student maximum.
template <int32_t DIV>
__device__ __forceinline__ void shift_to(Pass1& x, float ms, float mt, bool hard_sep, float k1) {
  Online<float>& o = x.o;
  const float fs = rescale_factor(o.m_s, ms), ft = rescale_factor(o.m_t, mt);
  if (hard_sep) x.d1 *= rescale_factor(__fmul_rn(o.m_s, k1), __fmul_rn(ms, k1));
  if (uses_wf(DIV)) o.wf = shift_numerator(o.wf, o.d_t, ft, o.m_t, mt, o.m_s, ms);
  if (uses_wr(DIV)) o.wr = shift_numerator(o.wr, o.d_s, fs, o.m_s, ms, o.m_t, mt);
  o.d_s *= fs;
  o.d_t *= ft;
  o.m_s = ms;
  o.m_t = mt;
}

// x <- union of the streams of x and y (online_merge, plus d1)
template <int32_t DIV>
__device__ __forceinline__ void merge(Pass1& x, const Pass1& y, bool hard_sep, float k1) {
  const float mx = __fmul_rn(x.o.m_s, k1), my = __fmul_rn(y.o.m_s, k1);
  online_merge<DIV>(x.o, y.o);
  if (hard_sep) {
    const float m = __fmul_rn(x.o.m_s, k1);
    x.d1 = x.d1 * rescale_factor(mx, m) + y.d1 * rescale_factor(my, m);
  }
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

template <int32_t DIV>
__device__ __forceinline__ void warp_merge(Pass1& x, bool hard_sep, float k1) {
  constexpr int K = pass1_floats<DIV>();
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    float v[K];
    to_array<DIV>(x, v);
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = __shfl_down_sync(0xffffffffu, v[i], off);
    merge<DIV>(x, from_array<DIV>(v), hard_sep, k1);
  }
}

// The row's pass-1 state, returned to every thread. sm: (kWarp + 1) * pass1_floats floats.
template <int32_t DIV>
__device__ __forceinline__ Pass1 block_merge(Pass1 x, bool hard_sep, float k1, float* sm) {
  constexpr int K = pass1_floats<DIV>();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float v[K];
  warp_merge<DIV>(x, hard_sep, k1);
  if (lane == 0) {
    to_array<DIV>(x, v);
#pragma unroll
    for (int i = 0; i < K; ++i) sm[warp * K + i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
    Pass1 y{online_empty<float>(), 0.0f};
    if (lane < kWarps) {
#pragma unroll
      for (int i = 0; i < K; ++i) v[i] = sm[lane * K + i];
      y = from_array<DIV>(v);
    }
    warp_merge<DIV>(y, hard_sep, k1);
    if (lane == 0) {
      to_array<DIV>(y, v);
#pragma unroll
      for (int i = 0; i < K; ++i) sm[kWarp * K + i] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = sm[kWarp * K + i];
  return from_array<DIV>(v);
}

// ---- the kernel: one block per row ------------------------------------------------------------------

// At least 3 blocks per SM: ptxas may then use up to 85 registers (left alone it picked 64 for
// some variants and spilled a value to the stack).
// The kernel's argument: the call's DistillArgs and the per-call constants derived from them on
// the host, so that they sit in the parameter bank instead of registers.
struct KernelArgs {
  DistillArgs a;
  MixWeights mw;
};

template <int32_t SD, int32_t DIV>
__global__ void __launch_bounds__(kThreads, 3) distill_kernel(const KernelArgs K) {
  const DistillArgs& A = K.a;
  __shared__ float sm1[(kWarp + 1) * 7];
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
  const float sm = P.s_mul, tm = P.t_mul, hm = P.h_mul;
  const bool hard_sep = hard && hm != sm;  // CE needs its own LSE
  const float k1 = P.h_ratio;
  const bool vec = aligned16(srow) && aligned16(trow);
  const float ninf = -fd_inf();

  // ---- pass 1: online statistics of a = s_mul z_s and b = t_mul z_t (and of h_mul z_s) ----
  // __fmul_rn: the product is rounded once, identically in the max and in every later use
  Pass1 x{online_empty<float>(), 0.0f};
  for_each_unit<SD>(srow, trow, A.t_dtype, V, V, vec,
                    [&](int, const float(&zs)[N], const float(&zt)[N]) {
    // in groups of 4 columns: fewer values live at once (registers)
#pragma unroll
    for (int g0 = 0; g0 < N; g0 += 4) {
      float a[4], b[4];
      float ums = ninf, umt = ninf;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        a[k] = __fmul_rn(zs[g0 + k], sm);
        b[k] = __fmul_rn(zt[g0 + k], tm);
        ums = fmaxf(ums, a[k]);
        umt = fmaxf(umt, b[k]);
      }
      const float ms = fmaxf(x.o.m_s, ums), mt = fmaxf(x.o.m_t, umt);
      if (!(ms == x.o.m_s && mt == x.o.m_t)) shift_to<DIV>(x, ms, mt, hard_sep, k1);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float es = a[k] == ninf ? 0.0f : fd_exp(a[k] - ms);
        const float et = b[k] == ninf ? 0.0f : fd_exp(b[k] - mt);
        x.o.d_s += es;
        x.o.d_t += et;
        if (uses_wf(DIV)) x.o.wf += wf_term(a[k], b[k], ms, mt, et);
        if (uses_wr(DIV)) x.o.wr += wr_term(a[k], b[k], ms, mt, es);
      }
      if (hard_sep) {
        const float m1 = __fmul_rn(ms, k1);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float h = __fmul_rn(zs[g0 + k], hm);
          x.d1 += h == ninf ? 0.0f : fd_exp(h - m1);
        }
      }
    }
  });
  const Pass1 R = block_merge<DIV>(x, hard_sep, k1, sm1);

  const bool ok = row_ok(R.o.d_s, R.o.d_t);
  RowStats st;
  st.m_s = R.o.m_s;
  st.ld_s = logf(R.o.d_s);
  st.m_t = R.o.m_t;
  st.ld_t = logf(R.o.d_t);
  st.m_1 = hard_sep ? __fmul_rn(R.o.m_s, k1) : st.m_s;
  st.ld_1 = hard_sep ? logf(R.d1) : st.ld_s;
  float rkl = 0.0f;
  float div = pass1_divergence<DIV>(R.o, P.beta, rkl);
  st.aux = rkl;
  const MixWeights& mw = K.mw;

  // ---- pass 2: loss and aux for the mixture / tvd divergences (block-uniform branch) ----
  if (needs_pass2(DIV) && ok) {
    float acc[2] = {0.0f, 0.0f};  // loss, aux
    for_each_unit<SD>(srow, trow, A.t_dtype, V, V, vec,
                      [&](int, const float(&zs)[N], const float(&zt)[N]) {
#pragma unroll
      for (int k = 0; k < N; ++k)  // columns >= V are -inf on both sides: terms are 0
        acc[0] += pass2_term<DIV>(log_q(__fmul_rn(zs[k], sm), st),
                                  log_p(__fmul_rn(zt[k], tm), st), mw, acc[1]);
    });
    block_sum<2>(acc, sm2);
    div = acc[0];
    st.aux = acc[1];
  }

  // Written by the thread that owns the label's column (thread 0 without a hard loss): it
  // reads z_s[label] before it may overwrite that column with the gradient (aliasing).
  const int lab = hard ? int(label) : -1;  // in [0, V) when used
  if (threadIdx.x == (hard ? (lab / N) % kThreads : 0)) {
    // CE = LSE(h z) - h z[label] = (m - h z[label]) + log d: no cancellation of large logits
    const double hard_loss =
        hard ? double(st.m_1 - __fmul_rn(load_one<SD>(srow, lab), hm)) + double(st.ld_1) : 0.0;
    A.loss_rows[row] =
        ok ? float(double(P.soft_scale) * double(div) + double(P.hard_weight) * hard_loss)
           : fd_nan();
  }

  // ---- pass 3: gradient, columns >= V zero; NaN where the row's gradient is undefined ----
  if (!grow) return;
  const bool nan_row = !ok || grad_undefined<DIV>(st.aux);
  const float gs = *A.grad_scale;
  const float cs = gs * P.soft_scale * sm;  // d/dz = s_mul d/da
  const float ch = hard ? gs * P.hard_weight * hm : 0.0f;
  const float aux = st.aux;
  for_each_unit<SD>(srow, trow, A.t_dtype, W, V, vec,
                    [&](int c, const float(&zs)[N], const float(&zt)[N]) {
    float g[N];
    const int lk = lab - c;  // the label's position in this unit, if there
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float lq = log_q(__fmul_rn(zs[k], sm), st);
      float v = cs * soft_grad<DIV>(lq, log_p(__fmul_rn(zt[k], tm), st), mw, aux);
      if (ch != 0.0f) {
        // softmax of h z_s (when h_mul == s_mul this is exp(lq) bitwise: m_1, ld_1 = m_s, ld_s)
        v += ch * fd_exp((__fmul_rn(zs[k], hm) - st.m_1) - st.ld_1);
        if (k == lk) v -= ch;
      }
      v = nan_row ? fd_nan() : v;
      g[k] = k < V - c ? v : 0.0f;
    }
    store_unit<SD>(grow, c, W - c, vec_out, g);
  });
}

template <int32_t SD>
void launch(const DistillArgs& A, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(A.n_rows));
  dispatch_divergence(A.params.divergence, [&](auto tag) {
    constexpr int32_t DIV = decltype(tag)::value;
    const KernelArgs K{A, mix_weights<DIV>(A.params.beta)};
    distill_kernel<SD, DIV><<<grid, kThreads, 0, stream>>>(K);
  });
}

}  // namespace

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
    case kFloat32: launch<kFloat32>(A, s); break;
    case kFloat16: launch<kFloat16>(A, s); break;
    default: launch<kBFloat16>(A, s); break;
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace fastdistill
