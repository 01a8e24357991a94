// AVX2 + FMA matching kernel: 6 x 16 register tile (12 ymm accumulators).
#include <immintrin.h>

#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"

namespace cleandift {
namespace {

struct Avx2Micro {
  static constexpr int MR = 6, NR = 16;
  static void run(const float* a, const float* b, int64_t kc, float* tile, bool accumulate) {
    __m256 acc[MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = accumulate ? _mm256_loadu_ps(tile + r * NR) : _mm256_setzero_ps();
      acc[r][1] = accumulate ? _mm256_loadu_ps(tile + r * NR + 8) : _mm256_setzero_ps();
    }
    for (int64_t c = 0; c < kc; ++c, a += MR, b += NR) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
      for (int r = 0; r < MR; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(tile + r * NR, acc[r][0]);
      _mm256_storeu_ps(tile + r * NR + 8, acc[r][1]);
    }
  }
};

}  // namespace

void match_cpu_avx2(const FeatureView& src, const FeatureView& dst, DType dtype,
                    const MatchOptions& opt, const MatchOutput& out) {
  run_match<Avx2Micro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
