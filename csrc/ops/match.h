// Fused cosine-similarity matching: for every source vector the target vector(s) of highest cosine
// similarity, computed tile by tile without an N x M matrix (memory O(B (N + M))).
#pragma once
#include <cstdint>

#include "common/tensor_view.h"

namespace cleandift {

struct MatchOptions {
  bool mutual = false;       // also the column argmax from the same tiles; index -1 if not mutual
  int k = 1;                 // top-k per source vector (k > 1 excludes mutual)
  bool check_finite = true;  // reject NaN / Inf with an error naming the first bad element
};

// Outputs are [B, N, k] contiguous: index (int64), similarity (float32).
struct MatchOutput {
  int64_t* index = nullptr;
  float* similarity = nullptr;
};

// Checks sizes and options; throws std::invalid_argument with a message meant for users.
void check_match_args(const FeatureView& src, const FeatureView& dst, const MatchOptions& opt);

// CPU: OpenMP over (batch, row blocks[, column chunks]) with the micro-kernel of cpu_isa(compute)
// (bf16 products when compute is bf16). Throws std::domain_error naming the element when check_finite
// finds NaN / Inf, std::invalid_argument when bf16 compute is asked for on a CPU without it.
void match_cpu(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
               const MatchOutput& out, Compute compute = Compute::kFloat32);

// CUDA: device pointers, contiguous [B, rows, C]; `stream` is a cudaStream_t (0: default).
// Scratch is allocated with cudaMallocAsync on the stream. Throws std::runtime_error on CUDA errors,
// and when the module was built without CUDA.
void match_cuda(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                const MatchOutput& out, void* stream);

}  // namespace cleandift
