// Register-tile GEMM micro-kernels shared by the matching and projection-head kernels:
//   tile[MR][NR] (+)= A[kc][MR]^T . B[kc][NR]   (A, B packed panels; B 64-byte aligned)
// Elem is what the panels hold (float, or bf16 bits for the bf16 kernels), kDepthStep how many
// depth steps one step of the kernel consumes (kc, every depth offset and the packed depth are
// multiples of it), kAGroup / kBGroup how many consecutive depths each lane of an A / B panel
// holds together (panel_offset). The tile is fp32 either way. Scope is what a thread holds while
// it calls run (AMX: the tile configuration; nothing for the others).
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
#include "ops/cpu/amx_tiles.h"

namespace cleandift {
namespace {

// Position of (depth, lane) in a panel `width` lanes wide whose lanes hold runs of Group
// consecutive depths: [depth / Group][width][Group]. Group 1: fp32 [depth][width]; 2: bf16 pairs
// (vdpbf16ps, and AMX's B tiles: the VNNI layout); 32: AMX's A tiles (rows of 32 channels). A
// depth that is a multiple of Group starts at depth * width, so KC slices start there too.
template <int Group>
inline int64_t panel_offset(int64_t depth, int64_t lane, int64_t width) {
  static_assert((Group & (Group - 1)) == 0, "depth groups are powers of two");
  return (depth & ~int64_t{Group - 1}) * width + lane * Group + (depth & (Group - 1));
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

struct NoScope {};

struct PortableMicro {
  static constexpr int MR = 4, NR = 8, kDepthStep = 1, kAGroup = 1, kBGroup = 1;
  using Elem = float;
  using Scope = NoScope;
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
  static constexpr int MR = 6, NR = 16, kDepthStep = 1, kAGroup = 1, kBGroup = 1;
  using Elem = float;
  using Scope = NoScope;
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
  static constexpr int MR = 12, NR = 32, kDepthStep = 1, kAGroup = 1, kBGroup = 1;
  using Elem = float;
  using Scope = NoScope;
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
  static constexpr int MR = 12, NR = 32, kDepthStep = 2, kAGroup = 2, kBGroup = 2;
  using Elem = uint16_t;
  using Scope = NoScope;
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

// AMX-BF16 on a tile layer (amx_tiles.h: the instructions or their emulation). The 32 x 32 block
// is four 16 x 16 fp32 accumulator tiles (C: tmm0..3, [row half][column half]); each 32-deep step
// loads two A tiles (tmm4, tmm5: 16 rows x 32 bf16, rows of the [depth / 32][MR][32] panel) and
// two B tiles (tmm6, tmm7: 16 channel pairs x 16 columns, the [depth / 2][NR][2] VNNI panel) and
// runs four tdpbf16ps, each A and B tile feeding two of them.
template <class Tiles>
struct AmxMicro {
  static constexpr int MR = 32, NR = 32, kDepthStep = 32, kAGroup = 32, kBGroup = 2;
  using Elem = uint16_t;
  static constexpr CpuIsa isa = Tiles::isa;

  // Every tile 16 rows x 64 bytes, for the calling thread, released when it is done.
  struct Scope {
    Scope() {
      TileConfig config = palette_config();
      for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
      Tiles::configure(config);
    }
    ~Scope() { Tiles::release(); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;
  };

  static void run(const uint16_t* a, const uint16_t* b, int64_t kc, float* tile, bool accumulate) {
    constexpr int64_t kTileStride = NR * sizeof(float), kAStride = 32 * sizeof(uint16_t),
                      kBStride = NR * 2 * sizeof(uint16_t);
    float* const c[4] = {tile, tile + 16, tile + 16 * NR, tile + 16 * NR + 16};
    if (accumulate) {
      Tiles::template load<0>(c[0], kTileStride);
      Tiles::template load<1>(c[1], kTileStride);
      Tiles::template load<2>(c[2], kTileStride);
      Tiles::template load<3>(c[3], kTileStride);
    } else {
      Tiles::template zero<0>();
      Tiles::template zero<1>();
      Tiles::template zero<2>();
      Tiles::template zero<3>();
    }
    for (int64_t k = 0; k < kc; k += 32, a += 32 * MR, b += 32 * NR) {
      Tiles::template load<4>(a, kAStride);
      Tiles::template load<5>(a + 16 * 32, kAStride);
      Tiles::template load<6>(b, kBStride);
      Tiles::template load<7>(b + 32, kBStride);
      Tiles::template dpbf16ps<0, 4, 6>();
      Tiles::template dpbf16ps<1, 4, 7>();
      Tiles::template dpbf16ps<2, 5, 6>();
      Tiles::template dpbf16ps<3, 5, 7>();
    }
    Tiles::template store<0>(c[0], kTileStride);
    Tiles::template store<1>(c[1], kTileStride);
    Tiles::template store<2>(c[2], kTileStride);
    Tiles::template store<3>(c[3], kTileStride);
  }
};

}  // namespace
}  // namespace cleandift
