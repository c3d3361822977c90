// Error messages of the CUDA launchers (see launchers.h: last_error()).
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace fastdistill {
namespace cuda {
namespace {

// Per calling thread: launches from several Python threads do not mix their messages.
thread_local const char* t_last_error = "";

}  // namespace

int32_t fail(cudaError_t err) {
  t_last_error = cudaGetErrorString(err);  // a static string owned by the runtime
  return kCudaError;
}

const char* last_error() { return t_last_error; }

}  // namespace cuda
}  // namespace fastdistill
