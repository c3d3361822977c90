// In-place row scaling of a gradient for backward: grad[r, :] *= factor[r] (or factor[0]).
//
// The forward kernels already wrote the gradient times the reduction scale, so backward only
// multiplies by grad_output, which is exactly 1 for a scalar loss: a block whose factor is 1
// returns before touching memory, so backward costs one tiny launch and no host sync. Otherwise
// each element is read and written once (2 W E bytes per row), in 16-byte vectors where the row
// is aligned. Grid: x over rows, y over column blocks of kThreads units.

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace fastdistill {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <int32_t DT>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(void* grad, int64_t stride,
                                                              int width, const float* factor,
                                                              bool per_row) {
  constexpr int N = unit_cols<DT>();
  const int64_t row = blockIdx.x;
  const float f = per_row ? factor[row] : factor[0];
  const int c = (int(blockIdx.y) * kThreads + int(threadIdx.x)) * N;
  if (f == 1.0f || c >= width) return;
  void* g = static_cast<char*>(grad) + row * stride * elem_size(DT);
  const bool vec = aligned16(g);
  float x[N];
  to_floats<DT>(load_raw<DT, N, false>(g, c, width - c, vec), width - c, 0.0f, x);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] *= f;
  store_unit<DT>(g, c, width - c, vec, x);
}

template <int32_t DT>
void launch(void* grad, int64_t stride, int64_t n_rows, int64_t width, const float* factor,
            bool per_row, cudaStream_t stream) {
  constexpr int64_t per_block = int64_t(kThreads) * unit_cols<DT>();
  const dim3 grid(static_cast<unsigned int>(n_rows),
                  static_cast<unsigned int>((width + per_block - 1) / per_block));
  scale_rows_kernel<DT><<<grid, kThreads, 0, stream>>>(grad, stride, int(width), factor, per_row);
}

}  // namespace

int32_t scale_rows(const ScaleArgs& a) {
  if (a.dtype < 0 || a.dtype > 2) return kUnsupportedDType;
  // grid.y counts column blocks: at most 65535 of them (width up to 2^27 columns)
  if (a.n_rows < 0 || a.n_rows > kMaxRows || a.width < 0 ||
      a.width > (int64_t(65535) * kThreads * 4) || !a.factor ||
      (a.n_rows > 0 && a.width > 0 && !a.grad))
    return kBadArgument;
  if (a.n_rows == 0 || a.width == 0) return kOk;
  cudaStream_t s = static_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32: launch<kFloat32>(a.grad, a.stride, a.n_rows, a.width, a.factor, a.per_row, s); break;
    case kFloat16: launch<kFloat16>(a.grad, a.stride, a.n_rows, a.width, a.factor, a.per_row, s); break;
    default: launch<kBFloat16>(a.grad, a.stride, a.n_rows, a.width, a.factor, a.per_row, s); break;
  }
  return launch_status();
}

}  // namespace cuda
}  // namespace fastdistill
