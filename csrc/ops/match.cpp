// Argument checks and run-time dispatch of the matching op.
#include "ops/match.h"

#include <climits>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "ops/cpu/match_kernel.h"

namespace cleandift {

void check_match_args(const FeatureView& src, const FeatureView& dst, const MatchOptions& opt) {
  if (src.batch <= 0)
    throw std::invalid_argument("match: empty batch (B = 0); pass at least one feature map");
  if (dst.batch != src.batch)
    throw std::invalid_argument("match: src has batch " + std::to_string(src.batch) + " but dst has batch " +
                                std::to_string(dst.batch) + "; pair every source map with one target map");
  if (src.rows <= 0 || dst.rows <= 0)
    throw std::invalid_argument("match: no vectors to match (N = " + std::to_string(src.rows) +
                                ", M = " + std::to_string(dst.rows) + ")");
  if (src.channels <= 0 || src.channels != dst.channels)
    throw std::invalid_argument("match: src has " + std::to_string(src.channels) + " channels and dst " +
                                std::to_string(dst.channels) + "; both need the same C > 0");
  if (src.rows > INT32_MAX || dst.rows > INT32_MAX)
    throw std::invalid_argument("match: at most 2^31 - 1 vectors per map (N * M may exceed 2^31)");
  if (opt.k < 1) throw std::invalid_argument("match: k must be >= 1, got " + std::to_string(opt.k));
  if (opt.k > dst.rows)
    throw std::invalid_argument("match: k = " + std::to_string(opt.k) + " exceeds the " +
                                std::to_string(dst.rows) + " target vectors");
  if (opt.mutual && opt.k != 1)
    throw std::invalid_argument("match: mutual=True is defined for k = 1 only");
}

void match_cpu(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
               const MatchOutput& out, Compute compute) {
  check_match_args(src, dst, opt);
  switch (require_cpu_isa(compute, "match")) {
    case CpuIsa::kAmx: match_cpu_amx(src, dst, dtype, opt, out); break;
    case CpuIsa::kAmxEmulated: match_cpu_amx_emulated(src, dst, dtype, opt, out); break;
    case CpuIsa::kAvx512Bf16: match_cpu_avx512bf16(src, dst, dtype, opt, out); break;
    case CpuIsa::kAvx512: match_cpu_avx512(src, dst, dtype, opt, out); break;
    case CpuIsa::kAvx2: match_cpu_avx2(src, dst, dtype, opt, out); break;
    case CpuIsa::kPortable: match_cpu_portable(src, dst, dtype, opt, out); break;
  }
}

#ifndef CLEANDIFT_WITH_CUDA
void match_cuda(const FeatureView&, const FeatureView&, DType, const MatchOptions&, const MatchOutput&, void*) {
  throw std::runtime_error("match: this build of cleandift_rt has no CUDA kernels (rebuild with nvcc on PATH)");
}
#endif

}  // namespace cleandift
