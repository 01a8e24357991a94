// AVX512_BF16 matching kernel (12 x 32 register tile of vdpbf16ps: bf16 products, fp32 sums).
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"
#include "ops/cpu/micro_kernels.h"

namespace cleandift {

void match_cpu_avx512bf16(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                          const MatchOutput& out) {
  run_match<Avx512Bf16Micro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
