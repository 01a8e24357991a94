#include "common/cpu_features.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#if defined(__linux__)
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif
#define CLEANDIFT_X86 1
#endif

namespace cleandift {
namespace {

#ifdef CLEANDIFT_X86
unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

bool request_amx_permission() {
#if defined(__linux__)
  // Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

bool disabled(const char* name) {
  const char* env = std::getenv("CLEANDIFT_DISABLE_SIMD");
  if (!env) return false;
  std::string list = std::string(",") + env + ",";
  return list.find(std::string(",") + name + ",") != std::string::npos ||
         list.find(",all,") != std::string::npos;
}

long detect_l2_bytes() {
  constexpr long kTypical = 512L << 10;
  long bytes = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
  bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
  // Unknown or implausible (some VMs report 0): a size every recent x86 / Arm core has.
  return bytes >= (128L << 10) && bytes <= (64L << 20) ? bytes : kTypical;
}

CpuFeatures detect() {
  CpuFeatures f;
  f.l2_bytes = detect_l2_bytes();
#ifdef CLEANDIFT_X86
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27);
  const bool fma = ecx & (1u << 12);
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;
  const bool os_tiles = (xcr0 & (3ull << 17)) == (3ull << 17);

  unsigned int max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  unsigned int eax1 = 0, ebx1, ecx1, edx1;
  __cpuid_count(7, 1, eax1, ebx1, ecx1, edx1);
  const bool avx512_bf16 = eax1 & (1u << 5);

  f.avx2 = os_ymm && avx2 && fma && !disabled("avx2");
  f.avx512 = os_zmm && avx512f && avx512dq && avx512bw && avx512vl && f.avx2 && !disabled("avx512");
  f.avx512_bf16 = f.avx512 && avx512_bf16 && !disabled("avx512_bf16");
  f.amx_bf16 = f.avx512 && amx_bf16 && amx_tile && os_tiles && !disabled("amx") && request_amx_permission();
#endif
  return f;
}

// The dispatch ladder, best rung first for each compute type.
struct Rung {
  CpuIsa isa;
  const char* name;
  Compute compute;
  bool CpuFeatures::*feature;  // null: every CPU
};
constexpr Rung kLadder[] = {
    {CpuIsa::kAvx512Bf16, "avx512_bf16", Compute::kBFloat16, &CpuFeatures::avx512_bf16},
    {CpuIsa::kAvx512, "avx512", Compute::kFloat32, &CpuFeatures::avx512},
    {CpuIsa::kAvx2, "avx2", Compute::kFloat32, &CpuFeatures::avx2},
    {CpuIsa::kPortable, "portable", Compute::kFloat32, nullptr},
};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::vector<std::string> cpu_feature_names() {
  const CpuFeatures& f = cpu_features();
  std::vector<std::string> names;
  if (f.avx2) names.push_back("avx2");
  if (f.avx512) names.push_back("avx512");
  if (f.avx512_bf16) names.push_back("avx512_bf16");
  if (f.amx_bf16) names.push_back("amx_bf16");
  return names;
}

const char* cpu_isa_name(CpuIsa isa) {
  for (const Rung& rung : kLadder)
    if (rung.isa == isa) return rung.name;
  return "unknown";
}

std::optional<CpuIsa> cpu_isa(Compute compute) {
  const CpuFeatures& f = cpu_features();
  for (const Rung& rung : kLadder)
    if (rung.compute == compute && (!rung.feature || f.*rung.feature)) return rung.isa;
  return std::nullopt;
}

CpuIsa require_cpu_isa(Compute compute, const char* op) {
  if (const auto isa = cpu_isa(compute)) return *isa;
  throw std::invalid_argument(std::string(op) + ": bf16 compute needs AVX512_BF16, which this CPU lacks; use fp32");
}

}  // namespace cleandift
