// Tile-reduction math of the matching kernels, shared by the CPU kernels (compiled once per ISA)
// and the CUDA kernel, so the rules the CUDA epilogue applies are the ones the CPU tests exercise.
//
// The rules:
//  * "better" orders candidates by similarity, then by the lower index (ties: lowest index wins);
//    NaN never wins (every comparison with NaN is false).
//  * vectors are divided by max(||x||, kNormEps) like torch.nn.functional.normalize, so a zero
//    vector stays zero and has similarity 0 with everything.
//  * a row that never saw a comparable similarity keeps index kNoMatch and similarity NaN.
//
// Everything here has internal linkage (static), for the reason given in common/elements.h.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/elements.h"

namespace cleandift {
namespace match_detail {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's default eps
constexpr int64_t kNoMatch = -1;

static CLEANDIFT_HD bool better(float v, int64_t i, float best_v, int64_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// (similarity, index) packed into one 64-bit key whose unsigned order is the "better" order
// (higher similarity, then lower index), so partial results merge with a max (CUDA: atomicMax).
// The caller never keys NaN; indices are < 2^32 - 1. kNoKey (0) is below every key.
constexpr uint64_t kNoKey = 0;

static CLEANDIFT_HD uint64_t match_key(float v, int64_t i) {
  uint32_t u = float_to_bits(v + 0.0f);  // -0 -> +0: the two zeros tie like in better()
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}

static CLEANDIFT_HD float key_value(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return bits_to_float(u);
}

static CLEANDIFT_HD int64_t key_index(uint64_t key) {
  return key == kNoKey ? kNoMatch : static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

static CLEANDIFT_HD float inverse_norm(double sum_sq) {
  const double norm = sqrt(sum_sq);
  return static_cast<float>(1.0 / (norm > kNormEps ? norm : kNormEps));
}

// Sorted top-k list of one row, best first: insert (v, j) if it beats the current k-th entry.
// Candidates arrive in any order; ties keep the lower index first.
static CLEANDIFT_HD void topk_insert(float* vals, int64_t* idx, int k, float v, int64_t j) {
  if (!better(v, j, vals[k - 1], idx[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && better(v, j, vals[pos - 1], idx[pos - 1])) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = j;
}

static CLEANDIFT_HD void topk_init(float* vals, int64_t* idx, int k) {
  for (int i = 0; i < k; ++i) {
    vals[i] = -INFINITY;
    idx[i] = INT64_MAX;  // loses every tie, so any real candidate replaces it
  }
}

// Final form of a row's result: rows that never saw a comparable value get (kNoMatch, NaN).
static CLEANDIFT_HD void finalize_entry(float& v, int64_t& i) {
  if (i == INT64_MAX) {
    i = kNoMatch;
    v = NAN;
  }
}

// Mutual nearest neighbours from the two directions of one pass: keep i -> j only if j's best
// source (from its column key) is i. The similarity keeps the forward best (documented), the
// index becomes kNoMatch.
static CLEANDIFT_HD int64_t mutual_index(int64_t i, int64_t row_best, const uint64_t* col_keys) {
  if (row_best < 0) return kNoMatch;
  return key_index(col_keys[row_best]) == i ? row_best : kNoMatch;
}

}  // namespace match_detail
}  // namespace cleandift
