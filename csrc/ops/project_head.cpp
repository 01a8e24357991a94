// Argument checks and run-time dispatch of the fused projection head.
#include "ops/project_head.h"

#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "ops/cpu/project_head_kernel.h"

namespace cleandift {

std::shared_ptr<PackedHead> pack_head(const float* up, const float* down, int64_t dim, Compute compute) {
  if (dim <= 0) throw std::invalid_argument("project: head width must be > 0");
  switch (require_cpu_isa(compute, "project")) {
    case CpuIsa::kAmx: return pack_head_amx(up, down, dim);
    case CpuIsa::kAmxEmulated: return pack_head_amx_emulated(up, down, dim);
    case CpuIsa::kAvx512Bf16: return pack_head_avx512bf16(up, down, dim);
    case CpuIsa::kAvx512: return pack_head_avx512(up, down, dim);
    case CpuIsa::kAvx2: return pack_head_avx2(up, down, dim);
    case CpuIsa::kPortable: break;
  }
  return pack_head_portable(up, down, dim);
}

void check_modulation(const HeadModulation& mod) {
  if (!mod.scale) throw std::invalid_argument("project: no modulation scales given");
  if (mod.conditioning == HeadConditioning::kFilm && !mod.shift)
    throw std::invalid_argument("project: FiLM heads need shifts [3, B, D] beside their scales");
  if (mod.conditioning == HeadConditioning::kAdaRms && mod.shift)
    throw std::invalid_argument("project: AdaRMS heads take no shifts (only FiLM heads do)");
}

void project_head_cpu(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                      const FeatureView& out, void* out_data) {
  check_modulation(mod);
  if (x.batch <= 0 || x.rows <= 0)
    throw std::invalid_argument("project: empty input (B = " + std::to_string(x.batch) + ", pixels = " +
                                std::to_string(x.rows) + ")");
  if (x.channels != head.dim)
    throw std::invalid_argument("project: features have " + std::to_string(x.channels) + " channels, the head " +
                                std::to_string(head.dim));
  if (out.batch != x.batch || out.rows != x.rows || out.channels != x.channels)
    throw std::invalid_argument("project: output shape differs from the input shape");
  switch (head.isa) {
    case CpuIsa::kAmx: project_head_amx(head, x, dtype, mod, out, out_data); break;
    case CpuIsa::kAmxEmulated: project_head_amx_emulated(head, x, dtype, mod, out, out_data); break;
    case CpuIsa::kAvx512Bf16: project_head_avx512bf16(head, x, dtype, mod, out, out_data); break;
    case CpuIsa::kAvx512: project_head_avx512(head, x, dtype, mod, out, out_data); break;
    case CpuIsa::kAvx2: project_head_avx2(head, x, dtype, mod, out, out_data); break;
    case CpuIsa::kPortable: project_head_portable(head, x, dtype, mod, out, out_data); break;
  }
}

#ifndef CLEANDIFT_WITH_CUDA
void project_head_cuda(const void*, void*, int64_t, int64_t, int64_t, DType, const float*, const float*,
                       const HeadModulation&, void*) {
  throw std::runtime_error("project: this build of cleandift_rt has no CUDA kernels (rebuild with nvcc on PATH)");
}
#endif

}  // namespace cleandift
