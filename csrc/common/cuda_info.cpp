#include "common/cuda_info.h"

#ifdef CLEANDIFT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace cleandift {

CudaInfo cuda_info() {
  CudaInfo info;
#ifdef CLEANDIFT_WITH_CUDA
  info.compiled = true;
  info.archs = CLEANDIFT_CUDA_ARCHS;
  info.toolkit_version = CLEANDIFT_CUDA_VERSION;
  cudaDriverGetVersion(&info.driver_version);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.status = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls report their own
    return info;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    info.devices.push_back({i, prop.name, prop.major, prop.minor, prop.totalGlobalMem});
  }
  info.status = count ? "ok" : "no CUDA device";
#else
  info.status = "built without CUDA (no nvcc at build time, or CLEANDIFT_CUDA=OFF)";
#endif
  return info;
}

}  // namespace cleandift
