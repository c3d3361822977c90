// Host (OpenMP) kernels. Each is compiled once per ISA level (namespaces base / avx2 / avx512,
// see setup.py) and csrc/cpu/dispatch.cpp picks the best one the running CPU supports. The
// arguments and their meaning are those of csrc/include/fastdistill/args.h; every function
// returns a Status.
#pragma once

#include <cstdint>

#include "fastdistill/args.h"

namespace fastdistill {
namespace cpu {

#define FD_DECLARE_CPU_KERNELS(ns)            \
  namespace ns {                              \
  int32_t distill_rows(const DistillArgs& a); \
  int32_t feature_rows(const FeatureArgs& a); \
  int32_t topk_rows(const TopkArgs& a);       \
  }

FD_DECLARE_CPU_KERNELS(base)
FD_DECLARE_CPU_KERNELS(avx2)
FD_DECLARE_CPU_KERNELS(avx512)
FD_DECLARE_CPU_KERNELS(best)  // dispatch.cpp: the fastest variant this CPU runs

// Name of the variant `best` resolves to ("avx512", "avx2" or "base").
const char* isa_name();

}  // namespace cpu
}  // namespace fastdistill
