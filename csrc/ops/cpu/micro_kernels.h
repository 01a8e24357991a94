// Register-tile GEMM micro-kernels shared by the matching and projection-head kernels:
//   tile[MR][NR] (+)= A[kc][MR]^T . B[kc][NR]   (A, B packed panels; B 64-byte aligned)
// Each ISA's kernel exists only in translation units compiled with that ISA (file suffix, see
// CMakeLists.txt); anonymous namespace: no cross-ISA sharing at link time.
#pragma once
#include <cstdint>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace cleandift {
namespace {

struct PortableMicro {
  static constexpr int MR = 4, NR = 8;
  static constexpr const char* name = "portable";
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

#if defined(__AVX2__) && defined(__FMA__)
// 6 x 16: 12 ymm accumulators, the B row in 2 ymm, A broadcast.
struct Avx2Micro {
  static constexpr int MR = 6, NR = 16;
  static constexpr const char* name = "avx2";
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
#endif

#if defined(__AVX512F__)
// 12 x 32: 24 zmm accumulators, the B row in 2 zmm, A broadcast from memory.
struct Avx512Micro {
  static constexpr int MR = 12, NR = 32;
  static constexpr const char* name = "avx512";
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
#endif

}  // namespace
}  // namespace cleandift
