// The AMX projection-head kernel over the emulated tile instructions (amx_tiles.h): runs on every
// CPU, bit-identical to project_head_kernel_amx.cpp (CLEANDIFT_CPU_KERNEL=amx_emulated).
#include "ops/cpu/micro_kernels.h"
#include "ops/cpu/project_head_kernel.h"
#include "ops/cpu/project_head_kernel_impl.h"

namespace cleandift {

std::shared_ptr<PackedHead> pack_head_amx_emulated(const float* up, const float* down, int64_t dim) {
  return pack_head_for<AmxMicro<EmulatedTiles>>(up, down, dim);
}

void project_head_amx_emulated(const PackedHead& head, const FeatureView& x, DType dtype,
                               const HeadModulation& mod, const FeatureView& out, void* out_data) {
  project_head_for<AmxMicro<EmulatedTiles>>(head, x, dtype, mod, out, out_data);
}

}  // namespace cleandift
