// The AMX matching kernel over the emulated tile instructions (amx_tiles.h): runs on every CPU,
// bit-identical to match_kernel_amx.cpp, for tests and comparisons (CLEANDIFT_CPU_KERNEL=amx_emulated).
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_amx_emulated(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                            const MatchOutput& out) {
  run_match<AmxMicro<EmulatedTiles>>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
