// What the CUDA side of the module can see. Safe on machines with no driver: the runtime is linked
// statically, so these calls return an error code (reported as a reason) instead of failing import.
#pragma once
#include <string>
#include <vector>

namespace cleandift {

struct CudaDevice {
  int index;
  std::string name;
  int major, minor;
  size_t total_memory;
};

struct CudaInfo {
  bool compiled = false;
  std::string archs;            // architectures the kernels were compiled for, "80;89;90"
  std::string toolkit_version;  // nvcc version used at build time
  int driver_version = 0;       // 0 when no driver
  std::vector<CudaDevice> devices;
  std::string status;           // "ok" or why no device is usable
};

CudaInfo cuda_info();

}  // namespace cleandift
