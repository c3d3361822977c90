// Device helpers shared by the .cu files: element I/O in units of N columns, block reductions,
// and the error reporting of the launchers. Included by .cu files only (needs nvcc, or the host
// emulation of tests/cuda_emu/).
//
// Units. A thread always owns the same columns of a row: unit u covers columns [N u, N u + N)
// (N = 16 bytes of the student: 4 float32 or 8 16-bit values) and thread `tid` of a block of
// `nt` threads takes units tid, tid + nt, tid + 2 nt, ... in that order. A unit is loaded with
// vector instructions (16 bytes, or 8 / 32 for a teacher of another width) when the row bases
// are 16-byte aligned and the unit lies inside the row, and with scalar loads otherwise (odd
// row strides or offsets, the row's last partial unit). Both paths give the same values to the
// same thread in the same order, so results do not depend on the alignment of a row (row r of
// a batch equals the same row passed on its own, bitwise).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "fastdistill/config.h"
#include "fastdistill/fast_math.h"

namespace fastdistill {
namespace cuda {

constexpr int kWarp = 32;

// ---- element I/O ------------------------------------------------------------------------------
// A unit of N columns travels as raw bits until it is used: N float32 in w[0..N), or N 16-bit
// values packed in pairs in w[0..N/2) (the rest 0). Loads depend only on the element width (4
// or 2 bytes); the conversion depends on the dtype. The kernels size units so that the student
// side is one 16-byte vector: N = 4 for float32, 8 for 16-bit types.

template <int32_t DT>
constexpr int unit_cols() {
  return DT == kFloat32 ? 4 : 8;
}

template <int N>
struct Raw {
  uint32_t w[N];
};

__host__ __device__ __forceinline__ int64_t elem_size(int32_t dtype) {
  return dtype == kFloat32 ? 4 : 2;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <bool NC, typename T>
__device__ __forceinline__ T ld(const T* p) {
  return NC ? __ldg(p) : *p;
}

// Columns c .. c + N - 1 of `row`, of which n = (row length - c) exist (n may be <= 0: nothing
// is read). `vec`: the row base is 16-byte aligned (c is a multiple of N, so the unit is
// aligned to its size). NC: the row is not written during the kernel (read-only data path).
template <int N, bool WIDE, bool NC>
__device__ __forceinline__ Raw<N> load_raw_w(const void* row, int c, int n, bool vec) {
  constexpr int kWords = WIDE ? N : N / 2;
  static_assert(kWords == 2 || kWords % 4 == 0, "unit of 8, 16 or 32 bytes");
  Raw<N> r;
  if (vec && n >= N) {
    const void* p = WIDE ? static_cast<const void*>(static_cast<const uint32_t*>(row) + c)
                         : static_cast<const void*>(static_cast<const uint16_t*>(row) + c);
    if (kWords == 2) {
      const uint2 v = ld<NC>(static_cast<const uint2*>(p));
      r.w[0] = v.x; r.w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        const uint4 v = ld<NC>(static_cast<const uint4*>(p) + i);
        r.w[4 * i] = v.x; r.w[4 * i + 1] = v.y; r.w[4 * i + 2] = v.z; r.w[4 * i + 3] = v.w;
      }
    }
  } else if (WIDE) {
    const uint32_t* p = static_cast<const uint32_t*>(row) + c;
#pragma unroll
    for (int k = 0; k < N; ++k) r.w[k] = k < n ? ld<NC>(p + k) : 0u;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + c;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const uint32_t lo = 2 * i < n ? ld<NC>(p + 2 * i) : 0u;
      const uint32_t hi = 2 * i + 1 < n ? ld<NC>(p + 2 * i + 1) : 0u;
      r.w[i] = lo | (hi << 16);
    }
  }
#pragma unroll
  for (int i = kWords; i < N; ++i) r.w[i] = 0u;
  return r;
}

template <int32_t DT, int N, bool NC>
__device__ __forceinline__ Raw<N> load_raw(const void* row, int c, int n, bool vec) {
  return load_raw_w<N, DT == kFloat32, NC>(row, c, n, vec);
}

// dtype known at run time (the teacher): one warp-uniform branch per unit
template <int N, bool NC>
__device__ __forceinline__ Raw<N> load_raw_rt(const void* row, int32_t dtype, int c, int n,
                                              bool vec) {
  return dtype == kFloat32 ? load_raw_w<N, true, NC>(row, c, n, vec)
                           : load_raw_w<N, false, NC>(row, c, n, vec);
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, sizeof h);
  return __half22float2(h);
}

// x[k] = element k of the unit as float32 for k < n, `fill` beyond.
template <int32_t DT, int N>
__device__ __forceinline__ void to_floats(const Raw<N>& r, int n, float fill, float (&x)[N]) {
  if (DT == kFloat32) {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = __uint_as_float(r.w[k]);
  } else if (DT == kBFloat16) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      x[2 * i] = __uint_as_float(r.w[i] << 16);
      x[2 * i + 1] = __uint_as_float(r.w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float2 f = half2_bits_to_float2(r.w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = k < n ? x[k] : fill;
}

template <int N>
__device__ __forceinline__ void to_floats_rt(const Raw<N>& r, int32_t dtype, int n, float fill,
                                             float (&x)[N]) {
  if (dtype == kBFloat16)
    to_floats<kBFloat16>(r, n, fill, x);
  else if (dtype == kFloat16)
    to_floats<kFloat16>(r, n, fill, x);
  else
    to_floats<kFloat32>(r, n, fill, x);
}

// float32 -> storage bits, round to nearest even (NaN stays NaN)
template <int32_t DT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t w;
  if (DT == kBFloat16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&w, &h, sizeof w);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&w, &h, sizeof w);
  }
  return w;
}

template <int32_t DT>
__device__ __forceinline__ uint16_t to_bits16(float x) {
  return DT == kBFloat16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x))
                         : __half_as_ushort(__float2half_rn(x));
}

// Columns c .. c + N - 1 of `row` = g, for the n of them that exist; N = unit_cols<DT>() (one
// 16-byte vector).
template <int32_t DT, int N>
__device__ __forceinline__ void store_unit(void* row, int c, int n, bool vec, const float (&g)[N]) {
  static_assert(N == unit_cols<DT>(), "stores are one 16-byte vector");
  if (DT == kFloat32) {
    float* p = static_cast<float*>(row) + c;
    if (vec && n >= N) {
      *reinterpret_cast<float4*>(p) = make_float4(g[0], g[1], g[2], g[3]);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (k < n) p[k] = g[k];
    }
  } else {
    uint16_t* p = static_cast<uint16_t*>(row) + c;
    if (vec && n >= N) {
      uint32_t w[N / 2];
#pragma unroll
      for (int i = 0; i < N / 2; ++i) w[i] = pack2<DT>(g[2 * i], g[2 * i + 1]);
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (k < n) p[k] = to_bits16<DT>(g[k]);
    }
  }
}

// Element j of a row as float32 (single reads, e.g. the label's logit).
template <int32_t DT>
__device__ __forceinline__ float load_one(const void* row, int64_t j) {
  if (DT == kFloat32) return static_cast<const float*>(row)[j];
  const uint32_t h = static_cast<const uint16_t*>(row)[j];
  if (DT == kBFloat16) return __uint_as_float(h << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

// Zeros in columns [0, width) of a row, by the whole block.
template <int32_t DT>
__device__ __forceinline__ void zero_row(void* row, int width, bool vec) {
  constexpr int N = unit_cols<DT>();
  float z[N];
#pragma unroll
  for (int k = 0; k < N; ++k) z[k] = 0.0f;
  for (int c = int(threadIdx.x) * N; c < width; c += int(blockDim.x) * N)
    store_unit<DT>(row, c, width - c, vec, z);
}

// ---- reductions ---------------------------------------------------------------------------------
// Fixed shuffle trees: bitwise deterministic. Every thread of the block must call the block
// versions (they contain __syncthreads); blockDim.x must be a multiple of 32 (the launchers
// only use such sizes), at most 1024.

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;  // complete in lane 0
}

// Sums of N values over the block, returned to every thread. `sm` holds 32 * N + N values:
// partials in the first 32 N, results in the last N, each written only after a barrier that
// every reader of the other passed, so back-to-back block_sum calls with the same N may share
// `sm` (with a different N the two regions would overlap: give each N its own array).
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&x)[N], T* sm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = warp_sum(x[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sm[warp * N + i] = x[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      T v = lane < nwarps ? sm[lane * N + i] : T(0);
      v = warp_sum(v);
      if (lane == 0) sm[kWarp * N + i] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = sm[kWarp * N + i];
}

// ---- shared-memory staging ----------------------------------------------------------------------
// 16 bytes global -> shared without a register round trip (cp.async on sm_80+; the copies of a
// thread complete in the order of its commits: wait_async(n) returns once at most n of its
// groups are still in flight).
__device__ __forceinline__ void copy_async16(void* smem, const void* gmem) {
  __pipeline_memcpy_async(smem, gmem, 16);
}
__device__ __forceinline__ void commit_async() { __pipeline_commit(); }
__device__ __forceinline__ void wait_async(int pending) {
  __pipeline_wait_prior(pending < 0 ? 0 : size_t(pending));
}

// 16 bytes starting `shift` bytes (0 <= shift < 16, a multiple of 2) into the 32-bit words
// w[0 .. 4] of shared memory: the realignment of a row whose start is not 16-byte aligned.
// Word reads and funnel shifts (5 LDS.32 + 4 SHF), no dynamic register indexing.
__device__ __forceinline__ uint4 read_shifted(const uint32_t* w, int shift) {
  const uint32_t* p = w + (shift >> 2);
  const int r = (shift & 3) * 8;
  const uint32_t a = p[0], b = p[1], c = p[2], d = p[3], e = p[4];
  return make_uint4(__funnelshift_r(a, b, r), __funnelshift_r(b, c, r), __funnelshift_r(c, d, r),
                    __funnelshift_r(d, e, r));
}

// ---- thread-block clusters (sm_90) -------------------------------------------------------------
// The CTAs of a cluster see each other's shared memory (distributed shared memory). Compiled for
// targets that have clusters (and the host emulation); elsewhere the launchers only use clusters
// of one CTA and these are never called.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FD_EMU_CLUSTERS)
#define FD_HAS_CLUSTERS 1
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
__device__ __forceinline__ void cluster_arrive() {
  (void)cooperative_groups::this_cluster().barrier_arrive();
}
__device__ __forceinline__ void cluster_wait() {
  cooperative_groups::this_cluster().barrier_wait();
}
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
#else
#define FD_HAS_CLUSTERS 0
__device__ __forceinline__ void cluster_sync() {}
__device__ __forceinline__ void cluster_arrive() {}
__device__ __forceinline__ void cluster_wait() {}
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, int) {
  return p;
}
#endif

// ---- launch status ------------------------------------------------------------------------------

// Records the message of a failed CUDA call for fastdistill::cuda::last_error() and returns the
// Status of the launcher.
int32_t fail(cudaError_t err);

// Status after a launch: kOk, or kCudaError with the message recorded (launch configuration
// errors, missing kernel image for this GPU, a sticky error of an earlier kernel).
inline int32_t launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : fail(err);
}

// One block per row: rows are grid.x (at most 2^31 - 1). Columns inside a row are int; the
// margin keeps a column index plus one block's stride of units from overflowing.
constexpr int64_t kMaxRows = 0x7fffffff;
constexpr int64_t kMaxCols = 0x7fffffff - (1 << 20);

}  // namespace cuda
}  // namespace fastdistill
