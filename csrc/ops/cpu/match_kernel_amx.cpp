// AMX-BF16 matching kernel (32 x 32 blocks of four tdpbf16ps accumulator tiles). The same source as
// match_kernel_amx_emulated.cpp, compiled for the tile instructions; both without FP contraction, so
// the two agree bit for bit (CMakeLists.txt).
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_amx(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                   const MatchOutput& out) {
  run_match<AmxMicro<AmxTiles>>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
