// Run-time CPU feature detection: kernels are compiled for several ISAs and the widest one the
// running CPU *and* operating system support is chosen here, never at build time.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "common/tensor_view.h"

namespace cleandift {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA, OS saves YMM state
  bool avx512 = false;      // AVX-512 F/BW/VL/DQ, OS saves ZMM state
  bool avx512_bf16 = false; // AVX512_BF16 dot products
  bool amx_bf16 = false;    // AMX-TILE + AMX-BF16, OS saves tile state, Linux granted tile data, palette 1 fits
  std::string amx_missing;  // why amx_bf16 is false ("" when it is true)
  long l2_bytes = 0;        // L2 cache per core as the OS reports it (a typical 512 KiB when it does not)
};

// Detected once, cached (the AMX permission request, a system call, runs here once per process).
// Respects CLEANDIFT_DISABLE_SIMD=avx512,avx2,... so every path can be tested on a machine that has
// the wider ones.
const CpuFeatures& cpu_features();

std::vector<std::string> cpu_feature_names();

// The ISAs the CPU kernels are compiled for: one rung each of the dispatch ladder (cpu_features.cpp).
// A new ISA is one more value here, one more rung there, and one more case in each op's dispatch
// switch (-Wswitch names an op that lacks it). kAmxEmulated is the AMX kernel over the portable
// emulation of the tile instructions (ops/cpu/amx_tiles.h): bit-identical to kAmx, far slower,
// chosen only when CLEANDIFT_CPU_KERNEL names it.
enum class CpuIsa : int { kPortable, kAvx2, kAvx512, kAvx512Bf16, kAmxEmulated, kAmx };

// "portable", "avx2", "avx512", "avx512_bf16", "amx_emulated", "amx": the names build_info(),
// PackedHead.kernel and CLEANDIFT_CPU_KERNEL use.
const char* cpu_isa_name(CpuIsa isa);

// The ISA every op runs `compute` with: the kernel CLEANDIFT_CPU_KERNEL names when it computes in
// `compute` (the variable is read at every call, so tests and benchmarks can switch), else the
// ladder's first automatic rung for `compute` whose feature cpu_features() reports. fp32 always has
// one (portable); bf16 has none without native bf16. Throws std::invalid_argument when the variable
// names no kernel, or a kernel for `compute` that this CPU cannot run (with the reason).
std::optional<CpuIsa> cpu_isa(Compute compute);

// cpu_isa(compute), or std::invalid_argument "<op>: bf16 compute needs AVX512_BF16, ..." when none.
CpuIsa require_cpu_isa(Compute compute, const char* op);

}  // namespace cleandift
