// A host emulation of the little of CUDA that csrc/cuda/ uses, so that the kernels' own source
// runs on a machine without a GPU. A thread is a cooperative fiber (ucontext) on one OS thread:
// it runs until it reaches a barrier, and a barrier opens when every thread it is for has
// arrived. What is emulated:
// - blocks of blockDim.x threads; __syncthreads, warp shuffles (down and xor, through a per-warp
//   buffer between two warp barriers);
// - launches with <<<...>>> (tests/cuda_emu/build.py rewrites them into emu_launch) and with
//   cudaLaunchKernelEx, including its cluster dimension: the blocks of a thread-block cluster run
//   together, each with its own dynamic shared memory (`extern __shared__` arrays; build.py
//   rewrites their declarations), and cooperative_groups::this_cluster() gives the cluster's
//   barrier (sync, or arrive and wait), block_rank and map_shared_rank (distributed shared
//   memory: a pointer into the shared memory of another block of the cluster);
// - cp.async through the pipeline primitives (__pipeline_memcpy_async copies at once; commit and
//   wait are no-ops), __funnelshift_r, the 16-bit conversions;
// - the device queries of the launchers (compute capability, opt-in shared memory per block),
//   set by emu_set_device (tests/cuda_emu/api.cpp), so that tests choose the kernel paths: sm_80
//   or sm_90, and a small shared memory that makes test-sized rows span clusters of 2 to 16 CTAs;
//   function attributes and cluster occupancy queries succeed.
// Clusters of blocks run one after another (so static `__shared__` arrays may be `static`: the
// kernels that run in clusters of more than one block use dynamic shared memory only). Numbers
// come from the host math of fastdistill/fast_math.h and dtype.h (FD_DEVICE_CODE is 0 here).
//
// What it checks: indexing, tails, alignment paths, the staging and realignment in shared memory,
// reductions and their barriers, the cluster exchange (a barrier that not every thread of the
// block or cluster reaches aborts with a message instead of hanging), aliasing between the
// gradient and the student. What it cannot: the GPU memory model (every copy lands at once), the
// hardware exp2 / log2 (the host polynomials stand in), register allocation, occupancy.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "fastdistill/dtype.h"

// kernels that need a construct the emulation spells differently (dynamic shared memory) test
// this
#define FD_CUDA_EMU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define FD_EMU_CLUSTERS 1

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- 16-bit types (bits + the host conversions of dtype.h) ----
struct __half { uint16_t x; };
struct __half2 { uint16_t x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { uint16_t x, y; };
inline __half __ushort_as_half(unsigned short h) { return {h}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) { return fastdistill::fp16_to_float(h.x); }
inline __half __float2half_rn(float f) { return {fastdistill::float_to_fp16(f)}; }
inline float2 __half22float2(__half2 h) {
  return {fastdistill::fp16_to_float(h.x), fastdistill::fp16_to_float(h.y)};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {fastdistill::float_to_fp16(lo), fastdistill::float_to_fp16(hi)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fastdistill::float_to_bf16(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {fastdistill::float_to_bf16(lo), fastdistill::float_to_bf16(hi)};
}

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
inline uint32_t __funnelshift_r(uint32_t lo, uint32_t hi, uint32_t shift) {
  const uint64_t v = (uint64_t(hi) << 32) | lo;
  return uint32_t(v >> (shift & 31u));
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- runtime API ----
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrComputeCapabilityMajor = 75,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace emu {
inline thread_local cudaError_t last_error = cudaSuccess;
// The emulated device (emu_set_device); each configuration has its own device number, so that
// launchers that cache the device's properties by number see a new device.
inline int device_major = 9;
inline int device_smem_optin = 227 << 10;
inline int device_number = 0;
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error"
         : e == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                              : "invalid argument";
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::device_number;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrComputeCapabilityMajor ? emu::device_major : emu::device_smem_optin;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize && v > emu::device_smem_optin)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveClusters(int* n, K, const cudaLaunchConfig_t*) {
  *n = 1;
  return cudaSuccess;
}

namespace emu {

struct Barrier;

// One emulated CUDA thread.
struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned idx = 0;    // threadIdx.x
  unsigned block = 0;  // its block's index in the cluster
  bool done = false;
  Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation
  unsigned long gen = 0;
  unsigned long arrived = 0;   // the generation of its last cluster arrive
};

inline thread_local ucontext_t scheduler;
inline thread_local Fiber* current = nullptr;

// A barrier for `n` threads. arrive() counts a thread in and opens the barrier when the last one
// arrives (the generation advances); wait(g) returns once generation g has opened, the thread
// going back to the scheduler until then. sync() is both.
struct Barrier {
  explicit Barrier(int n_) : n(n_) {}
  unsigned long arrive() {
    const unsigned long g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
    }
    return g;
  }
  void wait(unsigned long g) {
    if (gen > g) return;
    current->waiting = this;
    current->gen = g;
    swapcontext(&current->ctx, &scheduler);
  }
  void sync(const char*) { wait(arrive()); }
  int n, count = 0;
  unsigned long gen = 0;
};

struct Warp {
  Barrier bar{32};
  uint64_t slot[32];
};

struct Block {
  // dynamic shared memory filled with a pattern rather than zeros, as the GPU gives no zeros
  Block(int n, size_t smem)
      : bar(n), warps(n / 32),
        shared((smem + 15) / 16 + 1, uint4{0xa5a5a5a5u, 0xa5a5a5a5u, 0xa5a5a5a5u, 0xa5a5a5a5u}) {}
  Barrier bar;
  std::vector<Warp> warps;
  std::vector<uint4> shared;  // dynamic shared memory
  dim3 index;
};

// The blocks of the cluster that runs now.
struct Cluster {
  explicit Cluster(int n_threads) : bar(n_threads) {}
  Barrier bar;
  std::vector<std::unique_ptr<Block>> blocks;
};

inline thread_local Cluster* cluster = nullptr;
inline thread_local void (*body_fn)(void*) = nullptr;
inline thread_local void* body_arg = nullptr;

inline Block& block() { return *cluster->blocks[current->block]; }

inline void trampoline() {
  body_fn(body_arg);
  current->done = true;  // returns to uc_link: the scheduler
}

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(block().shared.data());
}
template <typename T>
inline T* dynamic_shared() {  // the spelling of kernels that test FD_CUDA_EMU
  return dynamic_smem<T>();
}

// Fiber stacks: reserved, not committed (pages are touched on use).
struct Stacks {
  static constexpr size_t kStack = 128 << 10;
  explicit Stacks(size_t n) : bytes(n * kStack) {
    base = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base == MAP_FAILED) {
      std::fprintf(stderr, "emulation: cannot reserve %zu bytes of fiber stacks\n", bytes);
      std::abort();
    }
  }
  ~Stacks() { munmap(base, bytes); }
  char* base;
  size_t bytes;
};

// Runs body() as the threads of every block of the grid, `cluster_size` blocks at a time (the
// blocks of one cluster together), one cluster after another.
template <typename F>
inline cudaError_t run(dim3 grid, dim3 block_dim, size_t smem, unsigned cluster_size, F& body) {
  if (block_dim.x == 0 || block_dim.x > 1024 || block_dim.x % 32 != 0 || block_dim.y != 1 ||
      block_dim.z != 1 || grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z != 1 ||
      cluster_size == 0 || cluster_size > 16 || grid.x % cluster_size != 0 ||
      smem > size_t(device_smem_optin) || (cluster_size > 1 && device_major < 9)) {
    // the kernels only launch whole warps; CUDA itself would accept other block sizes, but
    // every kernel here assumes them
    return cudaErrorInvalidConfiguration;
  }
  const unsigned n = block_dim.x * cluster_size;
  Stacks stacks(n);
  std::vector<Fiber> fibers(n);
  body_fn = [](void* f) { (*static_cast<F*>(f))(); };
  body_arg = &body;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster_size) {
      Cluster cl{int(n)};
      for (unsigned b = 0; b < cluster_size; ++b) {
        cl.blocks.emplace_back(new Block(int(block_dim.x), smem));
        cl.blocks.back()->index = dim3(bx0 + b, by);
      }
      cluster = &cl;
      blockDim = block_dim;
      gridDim = grid;
      for (unsigned t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        f = Fiber();
        f.idx = t % block_dim.x;
        f.block = t / block_dim.x;
        f.stack = stacks.base + size_t(t) * Stacks::kStack;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = Stacks::kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, trampoline, 0);
      }
      // round robin until every thread has finished; a sweep in which no thread can run means
      // a barrier that not every thread reaches
      for (unsigned alive = n; alive > 0;) {
        bool ran = false;
        for (auto& f : fibers) {
          if (f.done || (f.waiting != nullptr && f.waiting->gen == f.gen)) continue;
          f.waiting = nullptr;
          threadIdx = dim3(f.idx);
          blockIdx = cl.blocks[f.block]->index;
          current = &f;
          swapcontext(&scheduler, &f.ctx);
          ran = true;
          if (f.done) --alive;
        }
        if (!ran) {
          std::fprintf(stderr, "emulated barrier never opens: not every thread reaches it\n");
          std::abort();
        }
      }
      cluster = nullptr;
    }
  }
  return cudaSuccess;
}

}  // namespace emu

inline void __syncthreads() { emu::block().bar.sync("__syncthreads"); }

// fibers of a block run on one OS thread and switch only at barriers: a read-modify-write is
// atomic
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}

template <typename T>
inline T __shfl_down_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  const int lane = threadIdx.x % 32;
  emu::Warp& w = emu::block().warps[threadIdx.x / 32];
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar.sync("warp shuffle");
  T r = v;
  if (lane + off < 32) std::memcpy(&r, &w.slot[lane + off], sizeof(T));
  w.bar.sync("warp shuffle");
  return r;
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  const int lane = threadIdx.x % 32;
  emu::Warp& w = emu::block().warps[threadIdx.x / 32];
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar.sync("warp shuffle");
  T r;
  std::memcpy(&r, &w.slot[lane ^ mask], sizeof(T));
  w.bar.sync("warp shuffle");
  return r;
}

// ---- cp.async (cuda_pipeline_primitives.h): every copy lands at once ----
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size, size_t zfill = 0) {
  std::memcpy(dst, src, size - zfill);
  if (zfill) std::memset(static_cast<char*>(dst) + (size - zfill), 0, zfill);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

// ---- cooperative_groups: the cluster of the running block ----
namespace cooperative_groups {
struct cluster_group {
  struct arrival_token {
    unsigned long gen;
  };
  static void sync() { emu::cluster->bar.sync("cluster barrier"); }
  static arrival_token barrier_arrive() {
    emu::current->arrived = emu::cluster->bar.arrive();
    return arrival_token{emu::current->arrived};
  }
  static void barrier_wait() { emu::cluster->bar.wait(emu::current->arrived); }
  static void barrier_wait(arrival_token&& t) { emu::cluster->bar.wait(t.gen); }
  static unsigned block_rank() { return emu::current->block; }
  static unsigned num_blocks() { return unsigned(emu::cluster->blocks.size()); }
  template <typename T>
  static T* map_shared_rank(T* addr, int rank) {
    const char* mine = reinterpret_cast<const char*>(emu::block().shared.data());
    const size_t off = size_t(reinterpret_cast<const char*>(addr) - mine);
    if (rank < 0 || size_t(rank) >= emu::cluster->blocks.size() ||
        off >= emu::block().shared.size() * sizeof(uint4)) {
      std::fprintf(stderr, "emulated map_shared_rank: not a shared-memory address or bad rank\n");
      std::abort();
    }
    char* peer = reinterpret_cast<char*>(emu::cluster->blocks[rank]->shared.data());
    return reinterpret_cast<T*>(peer + off);
  }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

// kernel<<<grid, block, shmem, stream>>>(args) becomes emu_launch(grid, block, shmem, stream,
// [&] { kernel(args); }) (tests/cuda_emu/build.py rewrites the launches).
template <typename F>
inline void emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, F&& body) {
  const cudaError_t e = emu::run(grid, block, smem, 1, body);
  if (e != cudaSuccess) emu::last_error = e;
}

template <typename... Exp, typename... Act>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(Exp...),
                                      Act&&... args) {
  unsigned cluster_size = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cluster_size = cfg->attrs[i].val.clusterDim.x;
  auto body = [&] { kernel(args...); };
  const cudaError_t e = emu::run(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster_size,
                                 body);
  if (e != cudaSuccess) emu::last_error = e;
  return cudaSuccess;  // like CUDA: a bad configuration shows in cudaGetLastError
}
