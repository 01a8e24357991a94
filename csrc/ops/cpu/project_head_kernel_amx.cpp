// Projection-head kernel with the AMX-BF16 micro-kernel: bf16 weights and GEMM inputs in tiles, fp32
// accumulation, RMS statistics, SwiGLU and residual stream. The same source as
// project_head_kernel_amx_emulated.cpp; both without FP contraction, so the two agree bit for bit.
#include "ops/cpu/micro_kernels.h"
#include "ops/cpu/project_head_kernel.h"
#include "ops/cpu/project_head_kernel_impl.h"

namespace cleandift {

std::shared_ptr<PackedHead> pack_head_amx(const float* up, const float* down, int64_t dim) {
  return pack_head_for<AmxMicro<AmxTiles>>(up, down, dim);
}

void project_head_amx(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                      const FeatureView& out, void* out_data) {
  project_head_for<AmxMicro<AmxTiles>>(head, x, dtype, mod, out, out_data);
}

}  // namespace cleandift
