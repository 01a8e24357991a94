// Projection-head kernel with the portable micro-kernel.
#include "ops/cpu/micro_kernels.h"
#include "ops/cpu/project_head_kernel.h"
#include "ops/cpu/project_head_kernel_impl.h"

namespace cleandift {

std::shared_ptr<PackedHead> pack_head_portable(const float* up, const float* down, int64_t dim) {
  return pack_head_for<PortableMicro>(up, down, dim);
}

void project_head_portable(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                           const FeatureView& out, void* out_data) {
  project_head_for<PortableMicro>(head, x, dtype, mod, out, out_data);
}

}  // namespace cleandift
