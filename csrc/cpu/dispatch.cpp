// Picks the fastest compiled variant of the host kernels that the running CPU supports.
#include "cpu/kernels.h"

namespace fastdistill {
namespace cpu {
namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

const Isa kIsa = detect();

}  // namespace

const char* isa_name() {
  return kIsa == Isa::kAvx512 ? "avx512" : kIsa == Isa::kAvx2 ? "avx2" : "base";
}

#if defined(__x86_64__) || defined(_M_X64)
#define FD_PICK(fn, ...)                                  \
  (kIsa == Isa::kAvx512 ? avx512::fn(__VA_ARGS__)         \
   : kIsa == Isa::kAvx2 ? avx2::fn(__VA_ARGS__)           \
                        : base::fn(__VA_ARGS__))
#else
#define FD_PICK(fn, ...) base::fn(__VA_ARGS__)
#endif

namespace best {

int32_t distill_rows(const DistillArgs& a) { return FD_PICK(distill_rows, a); }
int32_t feature_rows(const FeatureArgs& a) { return FD_PICK(feature_rows, a); }
int32_t topk_rows(const TopkArgs& a) { return FD_PICK(topk_rows, a); }

}  // namespace best
}  // namespace cpu
}  // namespace fastdistill
