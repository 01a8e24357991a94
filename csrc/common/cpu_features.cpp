#include "common/cpu_features.h"

#include <cerrno>
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

// "" once Linux grants this process the AMX tile data (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA:
// without it the first tile instruction faults), else why not.
std::string request_amx_permission() {
#if defined(__linux__)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return "";
  return std::string("Linux refused the tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): ") +
         std::strerror(errno) + ")";
#else
  return "AMX tile data is requested from Linux only (arch_prctl)";
#endif
}

// Palette 1 (CPUID leaf 0x1D) holds the 8 tiles of 16 rows x 64 bytes the AMX kernel configures.
bool tile_palette_fits(unsigned max_leaf) {
  if (max_leaf < 0x1D) return false;
  unsigned int eax, ebx, ecx, edx;
  __cpuid_count(0x1D, 0, eax, ebx, ecx, edx);
  if (eax < 1) return false;  // highest palette
  __cpuid_count(0x1D, 1, eax, ebx, ecx, edx);
  const unsigned bytes_per_row = ebx & 0xffff, tiles = ebx >> 16, rows = ecx & 0xffff;
  return tiles >= 8 && bytes_per_row >= 64 && rows >= 16;
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
  f.amx_missing = "not an x86-64 CPU";
#ifdef CLEANDIFT_X86
  unsigned int eax, ebx, ecx, edx;
  f.amx_missing = "the CPU has no AMX-BF16 / AMX-TILE (CPUID.(EAX=7,ECX=0):EDX bits 22, 24)";
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = ecx & (1u << 27);
  const bool fma = ecx & (1u << 12);
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;
  const bool os_tiles = (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG, XTILEDATA

  unsigned int max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16), avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31);
  // CPUID.(EAX=7,ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  unsigned int eax1 = 0, ebx1, ecx1, edx1;
  __cpuid_count(7, 1, eax1, ebx1, ecx1, edx1);
  const bool avx512_bf16 = eax1 & (1u << 5);

  f.avx2 = os_ymm && avx2 && fma && !disabled("avx2");
  f.avx512 = os_zmm && avx512f && avx512dq && avx512bw && avx512vl && f.avx2 && !disabled("avx512");
  f.avx512_bf16 = f.avx512 && avx512_bf16 && !disabled("avx512_bf16");
  // The first reason that applies (the CPU's is set above); the permission request (a system call
  // that grows this process's saved state) only when everything else says yes.
  if (!(amx_bf16 && amx_tile)) return f;
  if (!os_tiles)
    f.amx_missing = "the OS does not enable AMX tile state (XCR0 bits 17, 18)";
  else if (!tile_palette_fits(max_leaf))
    f.amx_missing = "tile palette 1 (CPUID leaf 0x1D) lacks 8 tiles of 16 rows x 64 bytes";
  else if (!f.avx512)
    f.amx_missing = "AVX-512 is unavailable or disabled (the AMX kernel packs and reduces with it)";
  else if (disabled("amx"))
    f.amx_missing = "disabled by CLEANDIFT_DISABLE_SIMD";
  else
    f.amx_missing = request_amx_permission();
  f.amx_bf16 = f.amx_missing.empty();
#endif
  return f;
}

// The dispatch ladder, best rung first for each compute type. Rungs that are not automatic run only
// when CLEANDIFT_CPU_KERNEL names them.
struct Rung {
  CpuIsa isa;
  const char* name;
  Compute compute;
  bool CpuFeatures::*feature;  // null: every CPU
  bool automatic;
};
constexpr Rung kLadder[] = {
    {CpuIsa::kAmx, "amx", Compute::kBFloat16, &CpuFeatures::amx_bf16, true},
    {CpuIsa::kAvx512Bf16, "avx512_bf16", Compute::kBFloat16, &CpuFeatures::avx512_bf16, true},
    {CpuIsa::kAmxEmulated, "amx_emulated", Compute::kBFloat16, nullptr, false},
    {CpuIsa::kAvx512, "avx512", Compute::kFloat32, &CpuFeatures::avx512, true},
    {CpuIsa::kAvx2, "avx2", Compute::kFloat32, &CpuFeatures::avx2, true},
    {CpuIsa::kPortable, "portable", Compute::kFloat32, nullptr, true},
};

// The rung CLEANDIFT_CPU_KERNEL names (null when unset or empty); std::invalid_argument for other names.
const Rung* forced_rung() {
  const char* env = std::getenv("CLEANDIFT_CPU_KERNEL");
  if (!env || !*env) return nullptr;
  std::string names;
  for (const Rung& rung : kLadder) {
    if (std::strcmp(env, rung.name) == 0) return &rung;
    names += names.empty() ? rung.name : std::string(", ") + rung.name;
  }
  throw std::invalid_argument(std::string("CLEANDIFT_CPU_KERNEL=") + env + " names no CPU kernel; use one of " + names +
                              " (or unset it)");
}

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
  if (const Rung* forced = forced_rung(); forced && forced->compute == compute) {
    if (forced->feature && !(f.*forced->feature))
      throw std::invalid_argument(std::string("CLEANDIFT_CPU_KERNEL=") + forced->name + ", but this CPU cannot run it: " +
                                  (forced->isa == CpuIsa::kAmx ? f.amx_missing
                                                               : std::string("no ") + forced->name +
                                                                     " here (or CLEANDIFT_DISABLE_SIMD hides it)"));
    return forced->isa;
  }
  for (const Rung& rung : kLadder)
    if (rung.automatic && rung.compute == compute && (!rung.feature || f.*rung.feature)) return rung.isa;
  return std::nullopt;
}

CpuIsa require_cpu_isa(Compute compute, const char* op) {
  if (const auto isa = cpu_isa(compute)) return *isa;
  throw std::invalid_argument(std::string(op) + ": bf16 compute needs AVX512_BF16 or AMX-BF16, which this CPU lacks; "
                              "use fp32");
}

}  // namespace cleandift
