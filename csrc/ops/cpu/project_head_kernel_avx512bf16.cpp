// Projection-head kernel with the AVX512_BF16 micro-kernel: bf16 weights and GEMM inputs, fp32
// accumulation, RMS statistics, SwiGLU and residual stream.
#include "ops/cpu/micro_kernels.h"
#include "ops/cpu/project_head_kernel.h"
#include "ops/cpu/project_head_kernel_impl.h"

namespace cleandift {

std::shared_ptr<PackedHead> pack_head_avx512bf16(const float* up, const float* down, int64_t dim) {
  return pack_head_for<Avx512Bf16Micro>(up, down, dim);
}

void project_head_avx512bf16(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                             const FeatureView& out, void* out_data) {
  project_head_for<Avx512Bf16Micro>(head, x, dtype, mod, out, out_data);
}

}  // namespace cleandift
