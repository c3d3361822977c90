// The arguments of one kernel call, as they cross from Python into the kernels: one plain struct
// per op, shared by the host kernels, the CUDA launchers and the bindings. Torch-free.
//
// Pointers are addresses of tensor data (device memory for the CUDA kernels), strides are in
// elements, dtype codes are those of config.h. fastdistill/backends/_ext.py fills these structs
// (through the pybind11 bindings) after checking every tensor; the kernels re-check only what
// they need to stay memory-safe and return a Status.
#pragma once

#include <cstdint>

#include "fastdistill/config.h"

namespace fastdistill {

// Options of a logit-level call, identical for every row. With z_s, z_t a row's logits:
//   a = s_mul z_s, b = t_mul z_t (the divergence's logits: logit scale / T),
//   CE on h_mul z_s (the hard loss: the scaled student at T = 1),
//   loss = soft_scale * D(softmax(b) || softmax(a)) + hard_weight * CE.
struct DistillParams {
  int32_t divergence = 0;   // enum Divergence (divergence.h)
  float beta = 0.5f;        // jsd / skew_* mixing weight; symmetric_kl's ratio
  float s_mul = 1.0f;
  float t_mul = 1.0f;
  float h_mul = 1.0f;
  float h_ratio = 1.0f;     // h_mul / s_mul (the CUDA kernel derives the CE's shift from a's)
  float soft_scale = 1.0f;  // soft_weight * (T^2 if t2_scale else 1)
  float hard_weight = 0.0f;
  int64_t ignore_index = -100;
  int64_t vocab = 0;        // V: columns [0, V) are real; student columns [V, grad_width) get 0
};

// Logit-level distillation over n_rows rows:
//   loss_rows[r] = the row loss above (0 for ignored rows),
//   grad[r, :]   = *grad_scale * d loss_rows[r] / d student[r, :]   (grad == nullptr: loss only)
// grad has the student's dtype and grad_width >= vocab columns, and may alias the student.
struct DistillArgs {
  const void* student = nullptr;
  int32_t s_dtype = kFloat32;
  int64_t s_stride = 0;
  const void* teacher = nullptr;
  int32_t t_dtype = kFloat32;
  int64_t t_stride = 0;
  const int64_t* labels = nullptr;   // [n_rows]; nullptr: every row counts
  void* grad = nullptr;
  int64_t g_stride = 0;
  int64_t grad_width = 0;
  float* loss_rows = nullptr;        // [n_rows]
  const float* grad_scale = nullptr; // one float, read when grad != nullptr
  int64_t n_rows = 0;
  DistillParams params;
  int32_t num_threads = 1;           // host kernels: OpenMP threads
  void* stream = nullptr;            // CUDA kernels: the cudaStream_t to enqueue on
};

// Feature losses over n_rows rows of dim features (feature.h); rows whose mask is false give 0.
struct FeatureArgs {
  const void* student = nullptr;
  int32_t s_dtype = kFloat32;
  int64_t s_stride = 0;
  const void* teacher = nullptr;
  int32_t t_dtype = kFloat32;
  int64_t t_stride = 0;
  const bool* mask = nullptr;        // [n_rows]; nullptr: every row counts
  void* grad = nullptr;              // student dtype, [n_rows, dim]; nullptr: loss only
  int64_t g_stride = 0;
  float* loss_rows = nullptr;
  const float* grad_scale = nullptr;
  int64_t n_rows = 0;
  int64_t dim = 0;
  int32_t kind = 0;                  // enum FeatureKind (feature.h)
  int32_t num_threads = 1;
  void* stream = nullptr;
};

// grad[r, :width] *= factor[r] (per_row) or factor[0], in place; rows whose factor is exactly 1
// are not touched.
struct ScaleArgs {
  void* grad = nullptr;
  int32_t dtype = kFloat32;
  int64_t stride = 0;
  int64_t n_rows = 0;
  int64_t width = 0;
  const float* factor = nullptr;
  bool per_row = false;
  void* stream = nullptr;
};

// ---- sparse (top-k) teachers (fastdistill/topk.py; the math in topk.h) --------------------------

enum IndexType : int32_t { kInt32 = 0, kInt64 = 1 };
enum TopkTail : int32_t { kTailBucket = 0, kTailNone = 1, kTailRenormalize = 2 };

// Options of a top-k call, identical for every row. With z_s a row's student logits,
// a = s_mul z_s (logit scale / T), CE on h_mul z_s; the teacher's log-probabilities are used as
// given; loss = soft_scale * D_tail(P, Q) + hard_weight * CE.
struct TopkParams {
  int32_t divergence = 0;   // divergence code (fastdistill/divergences.py)
  float beta = 0.5f;        // jsd / skew_* mixing weight; symmetric_kl's ratio
  float s_mul = 1.0f;
  float h_mul = 1.0f;
  float soft_scale = 1.0f;
  float hard_weight = 0.0f;
  int64_t ignore_index = -100;
  int64_t vocab = 0;        // V: columns [0, V) are real, indices must lie in [0, V)
  int64_t k = 0;            // entries per row
  int32_t tail = kTailBucket;
};

// Top-k distillation over n_rows rows:
//   loss_rows[r] = the row loss (0 for ignored rows; NaN for a row with an index outside [0, V)
//                  or a repeated index, whose gradient is then 0),
//   grad[r, :]   = *grad_scale * d loss_rows[r] / d student[r, :]   (grad == nullptr: loss only)
// grad may alias the student. work: float32 [n_rows, k] scratch for the gradient at the indices
// (the CUDA kernels; the host kernels keep it per thread and accept nullptr).
struct TopkArgs {
  const void* student = nullptr;
  int32_t s_dtype = kFloat32;
  int64_t s_stride = 0;
  const void* indices = nullptr;
  int32_t i_dtype = kInt64;
  int64_t i_stride = 0;
  const void* logprobs = nullptr;
  int32_t l_dtype = kFloat32;
  int64_t l_stride = 0;
  const int64_t* labels = nullptr;
  void* grad = nullptr;
  int64_t g_stride = 0;
  int64_t grad_width = 0;
  float* loss_rows = nullptr;
  const float* grad_scale = nullptr;
  float* work = nullptr;
  int64_t n_rows = 0;
  TopkParams params;
  int32_t num_threads = 1;
  void* stream = nullptr;
};

}  // namespace fastdistill
