// AVX-512 matching kernel: 12 x 32 register tile (24 zmm accumulators, B row in 2 zmm, A broadcast
// from memory).
#include <immintrin.h>

#include "ops/cpu/match_kernel.h"
#include "ops/cpu/match_kernel_impl.h"

namespace cleandift {
namespace {

struct Avx512Micro {
  static constexpr int MR = 12, NR = 32;
  static void run(const float* a, const float* b, int64_t kc, float* tile, bool accumulate) {
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = accumulate ? _mm512_loadu_ps(tile + r * NR) : _mm512_setzero_ps();
      acc[r][1] = accumulate ? _mm512_loadu_ps(tile + r * NR + 16) : _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < kc; ++c, a += MR, b += NR) {
      const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(tile + r * NR, acc[r][0]);
      _mm512_storeu_ps(tile + r * NR + 16, acc[r][1]);
    }
  }
};

}  // namespace

void match_cpu_avx512(const FeatureView& src, const FeatureView& dst, DType dtype,
                      const MatchOptions& opt, const MatchOutput& out) {
  run_match<Avx512Micro>(src, dst, dtype, opt, out);
}

}  // namespace cleandift
