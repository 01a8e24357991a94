// The one pybind11 file: argument conversion and registration only; ops live in csrc/ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/cpu_features.h"
#include "common/cuda_info.h"

namespace py = pybind11;
using namespace cleandift;

PYBIND11_MODULE(_native, m) {
  m.doc() = "cleandift-rt native kernels (CPU with run-time SIMD dispatch; CUDA when compiled)";

  m.def("build_info", [] {
    py::dict d;
    d["compiler"] = CLEANDIFT_COMPILER;
    d["simd"] = cpu_feature_names();
    CudaInfo cuda = cuda_info();
    d["cuda_compiled"] = cuda.compiled;
    d["cuda_archs"] = cuda.archs;
    d["cuda_toolkit"] = cuda.toolkit_version;
    d["cuda_driver_version"] = cuda.driver_version;
    d["cuda_status"] = cuda.status;
    py::list devices;
    for (const auto& dev : cuda.devices) {
      py::dict dd;
      dd["index"] = dev.index;
      dd["name"] = dev.name;
      dd["capability"] = std::to_string(dev.major) + "." + std::to_string(dev.minor);
      dd["total_memory"] = dev.total_memory;
      devices.append(dd);
    }
    d["cuda_devices"] = devices;
    return d;
  });
}
