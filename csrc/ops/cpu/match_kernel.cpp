// Portable matching kernel (any x86-64 / other CPU): plain C++ register tile the compiler may
// vectorise with the baseline ISA.
#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"

namespace cleandift {
namespace {

struct PortableMicro {
  static constexpr int MR = 4, NR = 8;
  // tile[MR][NR] (+)= A[kc][MR]^T B[kc][NR]
  static void run(const float* a, const float* b, int64_t kc, float* tile, bool accumulate) {
    float acc[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int l = 0; l < NR; ++l) acc[r][l] = accumulate ? tile[r * NR + l] : 0.f;
    for (int64_t c = 0; c < kc; ++c, a += MR, b += NR)
      for (int r = 0; r < MR; ++r)
        for (int l = 0; l < NR; ++l) acc[r][l] += a[r] * b[l];
    for (int r = 0; r < MR; ++r)
      for (int l = 0; l < NR; ++l) tile[r * NR + l] = acc[r][l];
  }
};

}  // namespace

void match_cpu_portable(const FeatureView& src, const FeatureView& dst, DType dtype,
                        const MatchOptions& opt, const MatchOutput& out) {
  run_match<PortableMicro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
