// The CPU matching kernel, compiled once per ISA (match_kernel{,_avx2,_avx512,_avx512bf16,_amx,
// _amx_emulated}.cpp);
// ops/match.cpp picks one at run time.
#pragma once
#include "ops/match.h"

namespace cleandift {

void match_cpu_portable(const FeatureView& src, const FeatureView& dst, DType dtype,
                        const MatchOptions& opt, const MatchOutput& out);
void match_cpu_avx2(const FeatureView& src, const FeatureView& dst, DType dtype,
                    const MatchOptions& opt, const MatchOutput& out);
void match_cpu_avx512(const FeatureView& src, const FeatureView& dst, DType dtype,
                      const MatchOptions& opt, const MatchOutput& out);
// bf16 products (AVX512_BF16 / AMX-BF16 / its emulation), fp32 norms and accumulation.
void match_cpu_avx512bf16(const FeatureView& src, const FeatureView& dst, DType dtype,
                          const MatchOptions& opt, const MatchOutput& out);
void match_cpu_amx(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                   const MatchOutput& out);
void match_cpu_amx_emulated(const FeatureView& src, const FeatureView& dst, DType dtype,
                            const MatchOptions& opt, const MatchOutput& out);

}  // namespace cleandift
