// Portable matching kernel (any CPU): plain C++ register tile.
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_portable(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                   const MatchOutput& out) {
  run_match<PortableMicro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
