// Feature (hidden-state) losses mse, cosine and normalized_mse, with the student gradient, on the
// GPU: the contract of csrc/cpu/feature_cpu.cpp (cpu::feature_rows); the loss and the gradient
// coefficients come from feature_coef in csrc/include/fastdistill/feature.h, shared with it.
//
// One block per row. Thread `tid` of the block's nt threads owns the units (columns [c, c + N),
// N = 4 for float32, 8 for 16-bit types) tid, tid + nt, ... (see common.cuh).
//
//   rows of D <= kMaxThreads * kCacheCols (8192) features: the launcher sizes the block so that
//     each thread holds at most kCacheCols columns, and they stay in registers (as float) between
//     the passes. HBM traffic per row: D (E_s + E_t) read once + D E_s written, the floor.
//   wider rows: 512 threads stream the row from memory in every pass (2 reads, 3 for
//     normalized_mse, + 1 write; the later reads mostly hit L2).
//   masked rows: D E_s of zeros written, nothing read.
//
// Passes: (normalized_mse only) the row means; the row sums (sum (s - t)^2; or s.s, t.t, s.t,
// centred for normalized_mse); then the gradient cs (s - ms) + ct (t - mt). Each thread sums its
// columns in float per unit and in double across units, and the block reduces in double with a
// fixed shuffle tree: deterministic. Centring uses the float-rounded mean m~, which only shifts
// every centred value by the same delta = mean - m~; sum (x - m~)^2 = sum (x - mean)^2 + D delta^2
// (delta ~ 1 ulp of the mean), so nothing cancels.

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "fastdistill/feature.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kCacheCols = 16;  // columns per thread kept in registers


template <int32_t SD, bool CACHED>
__global__ void __launch_bounds__(kMaxThreads, 1) feature_kernel(const FeatureArgs A) {
  __shared__ double sm2[(kWarp + 1) * 2];
  __shared__ double sm3[(kWarp + 1) * 3];
  constexpr int N = unit_cols<SD>();
  constexpr int KU = CACHED ? kCacheCols / N : 1;  // units per thread in registers
  const int64_t row = blockIdx.x;
  const int D = int(A.dim);
  const int kind = A.kind;
  const int64_t s_elt = elem_size(SD);
  const void* srow = static_cast<const char*>(A.student) + row * A.s_stride * s_elt;
  const void* trow = static_cast<const char*>(A.teacher) + row * A.t_stride * elem_size(A.t_dtype);
  void* grow = A.grad ? static_cast<char*>(A.grad) + row * A.g_stride * s_elt : nullptr;
  const bool vec_out = grow != nullptr && aligned16(grow);
  if (A.mask && !A.mask[row]) {
    if (threadIdx.x == 0) A.loss_rows[row] = 0.0f;
    if (grow) zero_row<SD>(grow, D, vec_out);
    return;
  }
  const bool vec = aligned16(srow) && aligned16(trow);
  const int nt = blockDim.x;

  // Columns beyond D read as 0.
  auto load = [&](int c, float (&su)[N], float (&tu)[N]) {
    to_floats<SD>(load_raw<SD, N, false>(srow, c, D - c, vec), D - c, 0.0f, su);
    to_floats_rt(load_raw_rt<N, true>(trow, A.t_dtype, c, D - c, vec), A.t_dtype, D - c, 0.0f, tu);
  };
  float s[KU][N], t[KU][N];
  if (CACHED) {
#pragma unroll
    for (int k = 0; k < KU; ++k) load((int(threadIdx.x) + k * nt) * N, s[k], t[k]);
  }
  // f(c, s, t) for each unit of this thread, in order
  auto visit = [&](auto&& f) {
    if (CACHED) {
#pragma unroll
      for (int k = 0; k < KU; ++k) {
        const int c = (int(threadIdx.x) + k * nt) * N;
        if (c < D) f(c, s[k], t[k]);
      }
    } else {
      for (int c = int(threadIdx.x) * N; c < D; c += nt * N) {
        float su[N], tu[N];
        load(c, su, tu);
        f(c, su, tu);
      }
    }
  };

  double ms = 0.0, mt = 0.0;
  if (kind == kNormalizedMSE) {
    double acc[2] = {0.0, 0.0};
    visit([&](int, const float(&su)[N], const float(&tu)[N]) {
      float a = 0.0f, b = 0.0f;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        a += su[k];
        b += tu[k];
      }
      acc[0] += a;
      acc[1] += b;
    });
    block_sum<2>(acc, sm2);
    ms = acc[0] / D;
    mt = acc[1] / D;
  }
  const float msf = float(ms), mtf = float(mt);
  double acc[3] = {0.0, 0.0, 0.0};
  visit([&](int c, const float(&su)[N], const float(&tu)[N]) {
    float p = 0.0f, q = 0.0f, r = 0.0f;
    if (kind == kMSE) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float d = su[k] - tu[k];  // 0 beyond D
        p += d * d;
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float a = k < D - c ? su[k] - msf : 0.0f, b = k < D - c ? tu[k] - mtf : 0.0f;
        p += a * a;
        q += b * b;
        r += a * b;
      }
    }
    acc[0] += p;
    acc[1] += q;
    acc[2] += r;
  });
  block_sum<3>(acc, sm3);
  FeatureSums sums{0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  if (kind == kMSE) {
    sums.d2 = acc[0];
  } else {
    sums.ss = acc[0];
    sums.tt = acc[1];
    sums.st = acc[2];
    sums.mean_s = ms;
    sums.mean_t = mt;
  }
  // the row's coefficients (double math), computed once by thread 0 and shared
  __shared__ float coef[4];
  if (threadIdx.x == 0) {
    const FeatureCoef cf = feature_coef(kind, sums, D);
    A.loss_rows[row] = float(cf.loss);
    const float gs = grow ? *A.grad_scale : 0.0f;
    coef[0] = float(gs * cf.cs);
    coef[1] = float(gs * cf.ct);
    coef[2] = float(cf.ms);
    coef[3] = float(cf.mt);
  }
  if (!grow) return;
  __syncthreads();
  const float cs = coef[0], ct = coef[1], cms = coef[2], cmt = coef[3];
  visit([&](int c, const float(&su)[N], const float(&tu)[N]) {
    float g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = cs * (su[k] - cms) + ct * (tu[k] - cmt);
    store_unit<SD>(grow, c, D - c, vec_out, g);
  });
}

template <int32_t SD>
void launch(const FeatureArgs& A, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(A.n_rows));
  if (A.dim <= int64_t(kMaxThreads) * kCacheCols) {
    // whole warps, each thread holding at most kCacheCols columns
    const int64_t per_warp = int64_t(kWarp) * kCacheCols;
    const int threads = int((A.dim + per_warp - 1) / per_warp) * kWarp;
    feature_kernel<SD, true><<<grid, threads, 0, stream>>>(A);
  } else {
    feature_kernel<SD, false><<<grid, kMaxThreads, 0, stream>>>(A);
  }
}

}  // namespace

int32_t feature_rows(const FeatureArgs& A) {
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.t_dtype < 0 || A.t_dtype > 2) return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;  // nothing to read or write (empty tensors have no data)
  if (A.dim <= 0 || A.dim > kMaxCols || A.n_rows < 0 || A.n_rows > kMaxRows || A.kind < 0 ||
      A.kind > 2 || !A.student || !A.teacher || !A.loss_rows || (A.grad && !A.grad_scale))
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
