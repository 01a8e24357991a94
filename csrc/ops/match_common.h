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
// Everything here has internal linkage (static): this header is included by translation units
// compiled with different ISA flags, and an inline function with external linkage could be merged
// across them by the linker (AVX-512 code ending up on the portable path).
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define CLEANDIFT_HD __host__ __device__ __forceinline__
#else
#define CLEANDIFT_HD inline
#endif

namespace cleandift {
namespace match_detail {

constexpr double kNormEps = 1e-12;  // torch.nn.functional.normalize's default eps
constexpr int64_t kNoMatch = -1;

// Element types the kernels read; the computation is fp32 (tensor cores: fp16/bf16 in, fp32 acc).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

static CLEANDIFT_HD bool better(float v, int64_t i, float best_v, int64_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

static CLEANDIFT_HD uint32_t float_to_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
#endif
}

static CLEANDIFT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
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

static CLEANDIFT_HD float bf16_bits_to_float(uint16_t bits) {
  return bits_to_float(static_cast<uint32_t>(bits) << 16);
}

// IEEE binary16 -> binary32, exact for every input including subnormals, Inf and NaN.
static CLEANDIFT_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  return bits_to_float(u);
}

static CLEANDIFT_HD uint16_t float_to_bf16_bits(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static CLEANDIFT_HD uint16_t float_to_fp16_bits(float f) {  // round to nearest even
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // Inf, NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;                                    // rounds past 65504
  if (x < 0x38800000u) {                                                           // half subnormal / 0
    if (x < 0x33000000u) return sign;                                              // <= 2^-25: to 0
    const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126u - e;
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  const uint32_t u = x - 0x38000000u;
  uint32_t h = u >> 13;
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}

static CLEANDIFT_HD float load_as_float(const void* base, int64_t offset, DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return fp16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
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
