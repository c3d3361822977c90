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

int32_t distill_rows(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                     int32_t t_dtype, int64_t t_stride, const int64_t* labels, void* grad,
                     int64_t g_stride, int64_t grad_width, float* loss_rows, int64_t n_rows,
                     const DistillParams& params, float grad_scale, int32_t num_threads) {
  return FD_PICK(distill_rows, student, s_dtype, s_stride, teacher, t_dtype, t_stride, labels, grad,
                 g_stride, grad_width, loss_rows, n_rows, params, grad_scale, num_threads);
}

int32_t feature_rows(const void* student, int32_t s_dtype, int64_t s_stride, const void* teacher,
                     int32_t t_dtype, int64_t t_stride, const bool* mask, void* grad,
                     int64_t g_stride, float* loss_rows, int64_t n_rows, int64_t dim, int32_t kind,
                     float grad_scale, int32_t num_threads) {
  return FD_PICK(feature_rows, student, s_dtype, s_stride, teacher, t_dtype, t_stride, mask, grad,
                 g_stride, loss_rows, n_rows, dim, kind, grad_scale, num_threads);
}

}  // namespace best
}  // namespace cpu
}  // namespace fastdistill
