// Element conversions every kernel shares (CPU, compiled once per ISA, and CUDA): fp16 / bf16 bits
// to and from fp32, exact or rounded to nearest even, and loads / stores of a DType element.
//
// Everything here has internal linkage (static): this header is included by translation units
// compiled with different ISA flags, and an inline function with external linkage could be merged
// across them by the linker (AVX-512 code ending up on the portable path).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/tensor_view.h"

#if defined(__CUDACC__)
#define CLEANDIFT_HD __host__ __device__ __forceinline__
#else
#define CLEANDIFT_HD inline
#endif

namespace cleandift {

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

// base[offset] as fp32, the dtype chosen at run time (CUDA element-wise kernels).
static CLEANDIFT_HD float load_as_float(const void* base, int64_t offset, DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return fp16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    default: return static_cast<const float*>(base)[offset];
  }
}

// base[offset] as fp32 and back, the dtype fixed at compile time (the CPU drivers' inner loops).
template <DType D>
static inline float load_elem(const void* base, int64_t offset) {
  if constexpr (D == DType::kFloat32) return static_cast<const float*>(base)[offset];
  if constexpr (D == DType::kFloat16) return fp16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
  if constexpr (D == DType::kBFloat16) return bf16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
}

template <DType D>
static inline void store_elem(void* base, int64_t offset, float v) {
  if constexpr (D == DType::kFloat32) static_cast<float*>(base)[offset] = v;
  if constexpr (D == DType::kFloat16) static_cast<uint16_t*>(base)[offset] = float_to_fp16_bits(v);
  if constexpr (D == DType::kBFloat16) static_cast<uint16_t*>(base)[offset] = float_to_bf16_bits(v);
}

}  // namespace cleandift
