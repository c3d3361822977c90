// A host emulation of the little of CUDA that csrc/cuda/ uses, so that the kernels' own source
// runs on a machine without a GPU: a block is blockDim.x cooperative fibers (ucontext) on one
// OS thread, __syncthreads is a barrier over them, warp shuffles exchange values through a
// per-warp buffer between two warp barriers, blocks run one after another (so `__shared__` can
// be `static`). A fiber runs until it reaches a barrier; the barrier opens when every thread it
// is for has arrived. Numbers come from the host math of fastdistill/fast_math.h and dtype.h
// (FD_DEVICE_CODE is 0 here).
//
// What it checks: indexing, tails, alignment paths, reductions and their barriers (a barrier that
// not every thread of the block reaches aborts with a message instead of hanging), aliasing
// between the gradient and the student. What it cannot: the GPU memory model, the hardware
// exp/log, register allocation.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ucontext.h>
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
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- runtime API ----
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
namespace emu {
inline thread_local cudaError_t last_error = cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid configuration argument";
}

namespace emu {

struct Barrier;

// One emulated CUDA thread.
struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned idx = 0;
  bool done = false;
  Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation
  unsigned long gen = 0;
};

inline thread_local ucontext_t scheduler;
inline thread_local Fiber* current = nullptr;

// A barrier for `n` threads. The last one to arrive opens it and runs on; the others return to
// the scheduler until it opens.
struct Barrier {
  explicit Barrier(int n_) : n(n_) {}
  void wait(const char*) {
    const unsigned long g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
      return;
    }
    current->waiting = this;
    current->gen = g;
    swapcontext(&current->ctx, &scheduler);
  }
  int n, count = 0;
  unsigned long gen = 0;
};

struct Warp {
  Barrier bar{32};
  uint64_t slot[32];
};

struct Block {
  explicit Block(int n) : bar(n), warps(n / 32) {}
  Barrier bar;
  std::vector<Warp> warps;
};

inline thread_local Block* block = nullptr;
inline thread_local void (*body_fn)(void*) = nullptr;
inline thread_local void* body_arg = nullptr;

inline void trampoline() {
  body_fn(body_arg);
  current->done = true;  // returns to uc_link: the scheduler
}

}  // namespace emu

inline void __syncthreads() { emu::block->bar.wait("__syncthreads"); }

// fibers of a block run on one OS thread and switch only at barriers: a read-modify-write is
// atomic
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}

namespace emu {
// the dynamic shared memory of the running block (`extern __shared__ T name[]` in CUDA):
// launch's shmem bytes, filled with a pattern rather than zeros, as the GPU gives no zeros
inline thread_local std::vector<uint64_t> dyn_smem;
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(dyn_smem.data());
}
}  // namespace emu

template <typename T>
inline T __shfl_down_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 8, "one slot per lane");
  const int lane = threadIdx.x % 32;
  emu::Warp& w = emu::block->warps[threadIdx.x / 32];
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.bar.wait("warp shuffle");
  T r = v;
  if (lane + off < 32) std::memcpy(&r, &w.slot[lane + off], sizeof(T));
  w.bar.wait("warp shuffle");
  return r;
}

// kernel<<<grid, block, shmem, stream>>>(args) becomes emu_launch(grid, block, shmem, stream,
// [&] { kernel(args); }) (tests/cuda_emu/build.py rewrites the launches).
template <typename F>
inline void emu_launch(dim3 grid, dim3 block, size_t shmem, cudaStream_t, F&& body) {
  if (block.x == 0 || block.x > 1024 || block.x % 32 != 0 || block.y != 1 || block.z != 1 ||
      grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z != 1) {
    // the kernels only launch whole warps; CUDA itself would accept other block sizes, but
    // every kernel here assumes them
    emu::last_error = cudaErrorInvalidConfiguration;
    return;
  }
  constexpr size_t kStack = 256 << 10;
  std::vector<char> stacks(kStack * block.x);
  std::vector<emu::Fiber> fibers(block.x);
  emu::body_fn = [](void* f) { (*static_cast<F*>(f))(); };
  emu::body_arg = &body;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      emu::dyn_smem.assign((shmem + 7) / 8, 0xa5a5a5a5a5a5a5a5ull);
      emu::Block ctx(int(block.x));
      blockIdx = dim3(bx, by);
      blockDim = block;
      gridDim = grid;
      emu::block = &ctx;
      for (unsigned t = 0; t < block.x; ++t) {
        emu::Fiber& f = fibers[t];
        f = emu::Fiber();
        f.idx = t;
        f.stack = stacks.data() + t * kStack;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &emu::scheduler;
        makecontext(&f.ctx, emu::trampoline, 0);
      }
      // round robin until every thread has finished; a sweep in which no thread can run means
      // a barrier that not every thread reaches
      for (unsigned alive = block.x; alive > 0;) {
        bool ran = false;
        for (auto& f : fibers) {
          if (f.done || (f.waiting != nullptr && f.waiting->gen == f.gen)) continue;
          f.waiting = nullptr;
          threadIdx = dim3(f.idx);
          emu::current = &f;
          swapcontext(&emu::scheduler, &f.ctx);
          ran = true;
          if (f.done) --alive;
        }
        if (!ran) {
          std::fprintf(stderr, "emulated barrier never opens: not every thread reaches it\n");
          std::abort();
        }
      }
    }
  }
}
