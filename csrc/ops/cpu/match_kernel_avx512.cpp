// AVX-512 matching kernel (12 x 32 register tile).
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_avx512(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                   const MatchOutput& out) {
  run_match<Avx512Micro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
