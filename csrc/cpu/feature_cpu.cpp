// Feature losses (mse, cosine, normalized_mse) and their student gradient on the host.
//
// One OpenMP thread per row; a row (D features) is converted to float32 once into a thread-local
// buffer, so the two passes (row sums, then gradient) read main memory once: bytes moved per row
// are D * (size(s) + size(t) + size(grad)). Sums are taken in double in a fixed order
// (bitwise reproducible); the math is csrc/include/fastdistill/feature.h.
//
// Compiled once per ISA level with -DFD_ISA=<namespace> (see setup.py).

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"
#include "fastdistill/dtype.h"
#include "fastdistill/feature.h"

#ifndef FD_ISA
#define FD_ISA base
#endif

namespace fastdistill {
namespace cpu {
namespace FD_ISA {
namespace {

void load_row(const void* row, int32_t dtype, int64_t n, float* __restrict out) {
  if (dtype == kFloat32) {
    std::memcpy(out, row, sizeof(float) * n);
  } else if (dtype == kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(row);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
  }
}

void store_row(void* row, int32_t dtype, int64_t n, const float* __restrict in) {
  if (dtype == kFloat32) {
    std::memcpy(row, in, sizeof(float) * n);
  } else if (dtype == kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(row);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(in[i]);
  } else {
    uint16_t* p = static_cast<uint16_t*>(row);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_fp16(in[i]);
  }
}

FeatureSums row_sums(int32_t kind, const float* __restrict s, const float* __restrict t, int64_t n) {
  FeatureSums r{0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  if (kind == kMSE) {
    double d2 = 0.0;
#pragma omp simd reduction(+ : d2)
    for (int64_t i = 0; i < n; ++i) {
      const double d = (double)s[i] - (double)t[i];
      d2 += d * d;
    }
    r.d2 = d2;
    return r;
  }
  double ms = 0.0, mt = 0.0;
  if (kind == kNormalizedMSE) {  // centre first: exact variance without cancellation
#pragma omp simd reduction(+ : ms, mt)
    for (int64_t i = 0; i < n; ++i) {
      ms += s[i];
      mt += t[i];
    }
    ms /= (double)n;
    mt /= (double)n;
  }
  double ss = 0.0, tt = 0.0, st = 0.0;
#pragma omp simd reduction(+ : ss, tt, st)
  for (int64_t i = 0; i < n; ++i) {
    const double a = (double)s[i] - ms, b = (double)t[i] - mt;
    ss += a * a;
    tt += b * b;
    st += a * b;
  }
  r.ss = ss;
  r.tt = tt;
  r.st = st;
  r.mean_s = ms;
  r.mean_t = mt;
  return r;
}

}  // namespace

int32_t feature_rows(const FeatureArgs& A) {
  if (A.s_dtype < 0 || A.s_dtype > 2 || A.t_dtype < 0 || A.t_dtype > 2) return kUnsupportedDType;
  if (A.n_rows == 0) return kOk;  // nothing to read or write (empty tensors have no data)
  if (A.dim <= 0 || A.n_rows < 0 || A.kind < 0 || A.kind > 2 || !A.student || !A.teacher ||
      !A.loss_rows || (A.grad && !A.grad_scale))
    return kBadArgument;
  const int32_t s_dtype = A.s_dtype, t_dtype = A.t_dtype, kind = A.kind;
  const int64_t dim = A.dim, n_rows = A.n_rows;
  const size_t s_elt = s_dtype == kFloat32 ? 4 : 2, t_elt = t_dtype == kFloat32 ? 4 : 2;
  const int nt = A.num_threads > 0 ? A.num_threads : 1;
  const double grad_scale = A.grad ? *A.grad_scale : 0.0;

#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(3 * (size_t)dim);
    float* s = buf.data();
    float* t = s + dim;
    float* g = t + dim;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
      void* grow = A.grad ? static_cast<char*>(A.grad) + (size_t)r * A.g_stride * s_elt : nullptr;
      if (A.mask && !A.mask[r]) {
        A.loss_rows[r] = 0.0f;
        if (grow) std::memset(grow, 0, s_elt * dim);
        continue;
      }
      load_row(static_cast<const char*>(A.student) + (size_t)r * A.s_stride * s_elt, s_dtype, dim, s);
      load_row(static_cast<const char*>(A.teacher) + (size_t)r * A.t_stride * t_elt, t_dtype, dim, t);
      const FeatureCoef c = feature_coef(kind, row_sums(kind, s, t, dim), dim);
      A.loss_rows[r] = (float)c.loss;
      if (!grow) continue;
      const float cs = (float)(grad_scale * c.cs), ct = (float)(grad_scale * c.ct);
      const float ms = (float)c.ms, mt = (float)c.mt;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) g[i] = cs * (s[i] - ms) + ct * (t[i] - mt);
      store_row(grow, s_dtype, dim, g);
    }
  }
  return kOk;
}

}  // namespace FD_ISA
}  // namespace cpu
}  // namespace fastdistill
