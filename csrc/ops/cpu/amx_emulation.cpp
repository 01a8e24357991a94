// The AMX tile instructions emulated on any CPU (compiled for the portable baseline), with the
// semantics of the Intel SDM's pseudo-code. Each thread has its own tile state, as each hardware
// thread has its own tile registers.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/elements.h"
#include "ops/cpu/amx_tiles.h"

namespace cleandift {
namespace amx_emulation {
namespace {

constexpr int kTiles = 8, kMaxRows = 16, kMaxColsb = 64;

struct TileState {
  bool configured = false;
  TileConfig config{};
  alignas(64) unsigned char data[kTiles][kMaxRows][kMaxColsb] = {};
};
thread_local TileState state;

// What the hardware does here (#UD or #GP) is a fault; a fault in a kernel is a bug, so stop.
[[noreturn]] void fault(const char* what) {
  std::fprintf(stderr, "cleandift_rt: emulated AMX fault: %s\n", what);
  std::abort();
}

const TileConfig& config() {
  if (!state.configured) fault("tile instruction without a tile configuration (ldtilecfg)");
  return state.config;
}

int checked_tile(int tile) {
  if (tile < 0 || tile >= kTiles) fault("tile register out of range");
  return tile;
}

// Denormals as zero (keeping the sign), for inputs (DAZ) and results (FTZ).
inline float flush(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.f, v) : v; }

// a * b + c rounded once to fp32: the product of two bf16 values has at most 16 significant bits,
// so it is exact in double, and the double sum then rounds to the fp32 of the exact result
// (where the sum is inexact in double, one term is below 2^-28 of the other and the fp32
// result is the larger term either way).
inline float fma_bf16(float a, float b, float c) {
  return static_cast<float>(static_cast<double>(c) + static_cast<double>(a) * static_cast<double>(b));
}

constexpr int kCols = kMaxColsb / 4;  // rows are computed 16 columns wide (those past colsb are dropped)

// The first `rows` rows of tile t, 32 bf16 values each (zero past colsb), as fp32 with denormals read
// as zero; lo / hi: the smallest and largest unbiased exponent of the normal ones (lo > hi: none).
void tile_as_fp32(int t, int rows, float (*out)[2 * kCols], int& lo, int& hi) {
  int biased_lo = 0xff, biased_hi = 0;
  for (int r = 0; r < rows; ++r) {
    uint16_t bits[2 * kCols];
    std::memcpy(bits, state.data[t][r], sizeof bits);
    for (int i = 0; i < 2 * kCols; ++i) {
      const int e = (bits[i] >> 7) & 0xff;
      const bool normal = e != 0 && e != 0xff;  // zero, denormal, Inf, NaN: no rounding in a product
      biased_lo = std::min(biased_lo, normal ? e : 0xff);
      biased_hi = std::max(biased_hi, normal ? e : 0);
      out[r][i] = bits_to_float(static_cast<uint32_t>(e == 0 ? bits[i] & 0x8000u : bits[i]) << 16);
    }
  }
  lo = biased_lo - 127;
  hi = biased_hi - 127;
}

// Row m of tdpbf16ps: the even and the odd products of every pair in turn, then into dst's row.
template <class Fma, class Flush>
void dot_row(float* row, const float* a, const float (*b_even)[kCols], const float (*b_odd)[kCols], int pairs,
             Fma fma, Flush flush_sum) {
  float even[kCols] = {}, odd[kCols] = {};
  for (int k = 0; k < pairs; ++k)
    for (int n = 0; n < kCols; ++n) {
      even[n] = flush_sum(fma(a[2 * k], b_even[k][n], even[n]));
      odd[n] = flush_sum(fma(a[2 * k + 1], b_odd[k][n], odd[n]));
    }
  for (int n = 0; n < kCols; ++n) row[n] = flush(flush(row[n]) + flush_sum(even[n] + odd[n]));
}

}  // namespace

void load_config(const TileConfig& c) {
  if (c.palette_id != 1 || c.start_row != 0) fault("ldtilecfg: only palette 1 from row 0 is emulated");
  for (int t = 0; t < 16; ++t) {
    const bool used = t < kTiles;
    if ((!used && (c.rows[t] || c.colsb[t])) || c.rows[t] > kMaxRows || c.colsb[t] > kMaxColsb ||
        (c.rows[t] == 0) != (c.colsb[t] == 0))
      fault("ldtilecfg: a tile shape palette 1 does not allow");
  }
  state.config = c;
  state.configured = true;
  std::memset(state.data, 0, sizeof state.data);  // ldtilecfg zeroes every tile
}

void release() {
  state.configured = false;
  std::memset(state.data, 0, sizeof state.data);
}

void zero(int tile) {
  config();
  std::memset(state.data[checked_tile(tile)], 0, sizeof state.data[0]);
}

void load(int tile, const void* base, int64_t stride) {
  const TileConfig& c = config();
  const int t = checked_tile(tile);
  std::memset(state.data[t], 0, sizeof state.data[0]);  // bytes past colsb and rows past rows read as zero
  for (int r = 0; r < c.rows[t]; ++r)
    std::memcpy(state.data[t][r], static_cast<const unsigned char*>(base) + r * stride, c.colsb[t]);
}

void store(int tile, void* base, int64_t stride) {
  const TileConfig& c = config();
  const int t = checked_tile(tile);
  for (int r = 0; r < c.rows[t]; ++r)
    std::memcpy(static_cast<unsigned char*>(base) + r * stride, state.data[t][r], c.colsb[t]);
}

void dpbf16ps(int dst, int a, int b) {
  const TileConfig& c = config();
  const int d = checked_tile(dst), s1 = checked_tile(a), s2 = checked_tile(b);
  if (d == s1 || d == s2 || s1 == s2) fault("tdpbf16ps: the three tiles must differ");
  const int rows = c.rows[d], n_cols = c.colsb[d] / 4, pairs = c.colsb[s1] / 4;
  if (c.colsb[d] % 4 || c.colsb[s1] % 4 || c.rows[s1] != rows || c.rows[s2] != pairs || c.colsb[s2] != c.colsb[d])
    fault("tdpbf16ps: tile shapes do not fit (dst M x 4N, a M x 4K, b K x 4N bytes)");

  // Three ways to the same bits, the cheapest the operands allow. A bf16 value of exponent e is a
  // multiple of 2^(e-7), so every product and every (rounded) sum is a multiple of
  // q = 2^(lo_a + lo_b - 14). Products of exponent sums in [-126, 126] are normal fp32 values,
  // exact, and multiply-then-add rounds once like the FMA; if moreover q >= 2^-126 no nonzero sum
  // can be denormal and the flushes are no-ops. Otherwise the FMA goes through double (fma_bf16).
  float a_f[kMaxRows][2 * kCols], b_f[kMaxRows][2 * kCols];
  int lo_a, hi_a, lo_b, hi_b;
  tile_as_fp32(s1, rows, a_f, lo_a, hi_a);
  tile_as_fp32(s2, pairs, b_f, lo_b, hi_b);
  const bool no_products = lo_a > hi_a || lo_b > hi_b;
  const bool exact_products = no_products || (lo_a + lo_b >= -126 && hi_a + hi_b <= 126);
  const bool normal_sums = exact_products && (no_products || lo_a + lo_b - 14 >= -126);
  // b's even and odd elements of each column pair.
  float b_even[kMaxRows][kCols], b_odd[kMaxRows][kCols];
  for (int k = 0; k < pairs; ++k)
    for (int n = 0; n < kCols; ++n) {
      b_even[k][n] = b_f[k][2 * n];
      b_odd[k][n] = b_f[k][2 * n + 1];
    }
  const auto product_then_add = [](float x, float y, float acc) { return acc + x * y; };
  const auto through_double = [](float x, float y, float acc) { return fma_bf16(x, y, acc); };
  const auto keep = [](float v) { return v; };
  const auto flushed = [](float v) { return flush(v); };
  for (int m = 0; m < rows; ++m) {
    float row[kCols];
    std::memcpy(row, state.data[d][m], sizeof row);
    if (normal_sums)
      dot_row(row, a_f[m], b_even, b_odd, pairs, product_then_add, keep);
    else if (exact_products)
      dot_row(row, a_f[m], b_even, b_odd, pairs, product_then_add, flushed);
    else
      dot_row(row, a_f[m], b_even, b_odd, pairs, through_double, flushed);
    std::memset(state.data[d][m], 0, kMaxColsb);  // bytes past colsb become zero
    std::memcpy(state.data[d][m], row, 4 * n_cols);
  }
  for (int m = rows; m < kMaxRows; ++m) std::memset(state.data[d][m], 0, kMaxColsb);
}

}  // namespace amx_emulation
}  // namespace cleandift
