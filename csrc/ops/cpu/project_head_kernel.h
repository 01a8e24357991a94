// The CPU projection-head kernel, compiled once per ISA; ops/project_head.cpp picks one at run time.
#pragma once
#include "ops/project_head.h"

namespace cleandift {

#define CLEANDIFT_DECLARE_HEAD_KERNELS(isa)                                                          \
  std::shared_ptr<PackedHead> pack_head_##isa(const float* up, const float* down, int64_t dim);       \
  void project_head_##isa(const PackedHead& head, const FeatureView& x, DType dtype,                   \
                          const HeadModulation& mod, const FeatureView& out, void* out_data);
CLEANDIFT_DECLARE_HEAD_KERNELS(portable)
CLEANDIFT_DECLARE_HEAD_KERNELS(avx2)
CLEANDIFT_DECLARE_HEAD_KERNELS(avx512)
CLEANDIFT_DECLARE_HEAD_KERNELS(avx512bf16)
CLEANDIFT_DECLARE_HEAD_KERNELS(amx)
CLEANDIFT_DECLARE_HEAD_KERNELS(amx_emulated)
#undef CLEANDIFT_DECLARE_HEAD_KERNELS

}  // namespace cleandift
