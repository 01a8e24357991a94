// Run-time CPU feature detection: kernels are compiled for several ISAs and the widest one the
// running CPU *and* operating system support is chosen here, never at build time.
#pragma once
#include <string>
#include <vector>

namespace cleandift {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA, OS saves YMM state
  bool avx512 = false;      // AVX-512 F/BW/VL/DQ, OS saves ZMM state
  bool avx512_bf16 = false; // AVX512_BF16 dot products
  bool amx_bf16 = false;    // AMX tiles with BF16, OS permits tile data
  long l2_bytes = 0;        // L2 cache per core as the OS reports it (a typical 512 KiB when it does not)
};

// Detected once, cached. Respects CLEANDIFT_DISABLE_SIMD=avx512,avx2,... so every path can be
// tested on a machine that has the wider ones.
const CpuFeatures& cpu_features();

std::vector<std::string> cpu_feature_names();

}  // namespace cleandift
