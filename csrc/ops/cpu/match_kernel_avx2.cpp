// AVX2 + FMA matching kernel (6 x 16 register tile).
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_avx2(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                   const MatchOutput& out) {
  run_match<Avx2Micro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
