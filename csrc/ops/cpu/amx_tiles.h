// The tile layer the AMX micro-kernel (micro_kernels.h) is written against, in two implementations
// with one interface:
//   AmxTiles       the instructions (ldtilecfg, tilezero, tileloadd, tilestored, tdpbf16ps,
//                  tilerelease); only in translation units compiled with -mamx-tile -mamx-bf16;
//   EmulatedTiles  the same instructions emulated on any CPU with the semantics the Intel SDM
//                  defines (amx_emulation.cpp), so the one kernel source runs and is tested everywhere.
// Tile registers are template arguments (the instructions encode them).
#pragma once
#include <cstdint>

#include "common/cpu_features.h"
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#endif

namespace cleandift {

// The 64-byte operand of ldtilecfg (palette 1: 8 tiles of up to 16 rows x 64 bytes). Trivial (no
// constructor that a translation unit with wider ISA flags could emit for all): start from
// palette_config().
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];  // bytes per row of each tile
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads exactly 64 bytes");

// The emulated instructions on this thread's emulated tile state (amx_emulation.cpp). A use the
// hardware would fault on (#UD, #GP: no configuration, shapes that do not fit) aborts with a message.
namespace amx_emulation {
void load_config(const TileConfig& config);
void release();
void zero(int tile);
void load(int tile, const void* base, int64_t stride);
void store(int tile, void* base, int64_t stride);
// tdpbf16ps dst, a, b: per row m of dst, two fp32 sums start at 0 and take the even and the odd
// products of a's row m and b's column pairs, k = 0, 1, ... in order (FMA, round to nearest even);
// then dst[m][n] += even + odd. bf16 inputs and dst are read with denormals as zero, every result
// is flushed to zero when it is denormal (DAZ = FTZ = 1; MXCSR neither read nor written).
void dpbf16ps(int dst, int a, int b);
}  // namespace amx_emulation

namespace {  // internal linkage, for the reason given in common/elements.h

// Palette 1, every tile unused (0 rows, 0 bytes), to be shaped by the caller.
inline TileConfig palette_config() {
  TileConfig config{};
  config.palette_id = 1;
  return config;
}

struct EmulatedTiles {
  static constexpr CpuIsa isa = CpuIsa::kAmxEmulated;
  static void configure(const TileConfig& config) { amx_emulation::load_config(config); }
  static void release() { amx_emulation::release(); }
  template <int T>
  static void zero() { amx_emulation::zero(T); }
  template <int T>
  static void load(const void* base, int64_t stride) { amx_emulation::load(T, base, stride); }
  template <int T>
  static void store(void* base, int64_t stride) { amx_emulation::store(T, base, stride); }
  template <int D, int A, int B>
  static void dpbf16ps() { amx_emulation::dpbf16ps(D, A, B); }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// GCC's _tile_zero / _tile_loadd / _tile_stored / _tile_dpbf16ps paste their register argument
// into the asm text, so they take only literal numbers; these are the same instructions (AT&T
// operand order) with the register number as an immediate.
struct AmxTiles {
  static constexpr CpuIsa isa = CpuIsa::kAmx;
  static void configure(const TileConfig& config) { _tile_loadconfig(&config); }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int D, int A, int B>
  static void dpbf16ps() {
    __asm__ volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(D), "i"(A), "i"(B));
  }
};
#endif

}  // namespace
}  // namespace cleandift
