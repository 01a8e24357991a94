// Fused cosine-similarity matching: for every source vector the target vector(s) of highest cosine
// similarity, computed tile by tile without an N x M matrix (memory O(B (N + M))).
#pragma once
#include <cstdint>
#include <string>

#include "ops/match_common.h"

namespace cleandift {

using match_detail::DType;

// What the CPU kernels multiply in: fp32, or bf16 (inputs normalised in fp32, then rounded to bf16;
// products summed in fp32). bf16 needs AVX512_BF16 (cpu_features); it is never emulated.
enum class Compute : int { kFloat32 = 0, kBFloat16 = 1 };

// A strided [B, rows, C] view; strides are in elements (the [B, C, h, w] layout is the view
// with strides (C*h*w, 1, h*w), read in place).
struct FeatureView {
  const void* data = nullptr;
  int64_t batch = 0, rows = 0, channels = 0;
  int64_t stride_batch = 0, stride_row = 0, stride_channel = 0;
};

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

// CPU: OpenMP over (batch, row blocks[, column chunks]) with the widest micro-kernel this CPU runs
// for `compute`. Throws std::domain_error naming the element when check_finite finds NaN / Inf,
// std::invalid_argument when bf16 compute is asked for on a CPU without AVX512_BF16.
void match_cpu(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
               const MatchOutput& out, Compute compute = Compute::kFloat32);

// Name of the CPU micro-kernel match_cpu will use for `compute` ("avx512", "avx2", "portable";
// "avx512_bf16" for bf16); "" when this CPU has no kernel for it.
std::string match_cpu_kernel_name(Compute compute = Compute::kFloat32);

// Whether this CPU runs bf16 compute natively (AVX512_BF16; AMX tiles are not used yet).
bool cpu_has_bf16_compute();

// CUDA: device pointers, contiguous [B, rows, C]; `stream` is a cudaStream_t (0: default).
// Scratch is allocated with cudaMallocAsync on the stream. Throws std::runtime_error on CUDA errors,
// and when the module was built without CUDA.
void match_cuda(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                const MatchOutput& out, void* stream);

}  // namespace cleandift
