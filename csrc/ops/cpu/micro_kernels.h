// Register-tile GEMM micro-kernels shared by the matching and projection-head kernels:
//   tile[MR][NR] (+)= A[kc][MR]^T . B[kc][NR]   (A, B packed panels; B 64-byte aligned)
// Elem is what the panels hold (float, or bf16 bits for the bf16 kernel), kDepthStep how many
// depth steps one instruction consumes (bf16: channel pairs, so panels interleave pairs, see
// panel_offset, and kc and every depth offset are even). The tile is fp32 either way.
// Each ISA's kernel exists only in translation units compiled with that ISA (file suffix, see
// CMakeLists.txt); anonymous namespace: no cross-ISA sharing at link time.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/cpu_features.h"
#include "common/elements.h"

namespace cleandift {
namespace {

// Position of (depth, lane) in a panel `width` lanes wide: [depth][width] for fp32 panels,
// [depth / 2][width][2] for bf16 pairs. For an even depth d0 both are d0 * width, so slices of the
// panel start at the same element offset in both layouts.
template <class Micro>
inline int64_t panel_offset(int64_t depth, int64_t lane, int64_t width) {
  if constexpr (Micro::kDepthStep == 1) {
    return depth * width + lane;
  } else {
    return (depth & ~int64_t{1}) * width + lane * 2 + (depth & 1);
  }
}

// A value as a panel element: fp32 as is, bf16 rounded to nearest even.
template <class Elem>
inline Elem to_panel(float v) {
  if constexpr (sizeof(Elem) == 4) {
    return v;
  } else {
    return float_to_bf16_bits(v);
  }
}

// Depth rounded up to what the micro-kernel consumes per step.
template <class Micro>
constexpr int64_t padded_depth(int64_t depth) {
  return (depth + Micro::kDepthStep - 1) / Micro::kDepthStep * Micro::kDepthStep;
}

struct PortableMicro {
  static constexpr int MR = 4, NR = 8, kDepthStep = 1;
  using Elem = float;
  static constexpr CpuIsa isa = CpuIsa::kPortable;
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
  static constexpr int MR = 6, NR = 16, kDepthStep = 1;
  using Elem = float;
  static constexpr CpuIsa isa = CpuIsa::kAvx2;
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
  static constexpr int MR = 12, NR = 32, kDepthStep = 1;
  using Elem = float;
  static constexpr CpuIsa isa = CpuIsa::kAvx512;
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

#if defined(__AVX512BF16__)
// 12 x 32 with AVX512_BF16: vdpbf16ps multiplies 16 pairs of bf16 per zmm and adds both products
// to an fp32 lane, so one step consumes two channels. A pairs are broadcast as 32-bit words; the
// B row of a channel pair is 32 columns x 2 = two zmm. Same 24 fp32 accumulators as Avx512Micro.
struct Avx512Bf16Micro {
  static constexpr int MR = 12, NR = 32, kDepthStep = 2;
  using Elem = uint16_t;
  static constexpr CpuIsa isa = CpuIsa::kAvx512Bf16;
  static void run(const uint16_t* a, const uint16_t* b, int64_t kc, float* tile, bool accumulate) {
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      acc[r][0] = accumulate ? _mm512_loadu_ps(tile + r * NR) : _mm512_setzero_ps();
      acc[r][1] = accumulate ? _mm512_loadu_ps(tile + r * NR + 16) : _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < kc; c += 2, a += 2 * MR, b += 2 * NR) {
      const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 32);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + 2 * r, sizeof pair);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
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
