// Fused projection head of docs/method.md, projection heads (3 x [modulation -> up -> SwiGLU -> down -> residual]):
// every tile of pixels runs all three layers while it stays in cache; weights are packed once per
// head into the micro-kernel's panel layout, the modulation (AdaRMS or FiLM, computed from cond(t))
// comes in per call.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common/cpu_features.h"
#include "common/tensor_view.h"

namespace cleandift {

constexpr int kHeadLayers = 3;
constexpr float kHeadEps = 1e-6f;

// How a layer modulates its input before the up-projection:
//   AdaRMS (the release): x * rsqrt(mean(x^2) + eps) * scale;
//   FiLM (the paper's main configuration): x * scale + shift, no normalisation.
enum class HeadConditioning { kAdaRms, kFilm };

// Per call: scale [3, B, D] = 1 + scale(cond) per layer and batch element; shift [3, B, D] for FiLM
// (null for AdaRMS). float32, on the device the kernel runs on.
struct HeadModulation {
  HeadConditioning conditioning = HeadConditioning::kAdaRms;
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// std::invalid_argument unless the pointers fit the conditioning (FiLM needs a shift, AdaRMS has none).
void check_modulation(const HeadModulation& mod);

// Weights packed for one CPU micro-kernel (its NR and element type); built by pack_head,
// read-only afterwards.
struct PackedHead {
  int64_t dim = 0;          // D
  int64_t dim_padded = 0;   // D rounded up to NR
  int64_t depth = 0;        // D rounded up to the micro-kernel's depth step (bf16: pairs; AMX: 32)
  int nr = 0;
  CpuIsa isa = CpuIsa::kPortable;  // the micro-kernel packed for; the bf16 ones: bf16 weights and activations
  // Per layer: up as 2 * D/NR panels (value, gate interleaved) of depth x NR; down, D/NR panels of
  // Dp x NR; elements are fp32, or bf16 bits for the bf16 kernels (micro_kernels.h: panel_offset).
  std::vector<std::shared_ptr<void>> up, down;
};

// up: [3, 2D, D], down: [3, D, D], float32 C-contiguous (rows = outputs, like nn.Linear.weight).
// Packs for cpu_isa(compute); Compute::kBFloat16 rounds the weights to bf16 (std::invalid_argument
// where this CPU has no bf16 kernel).
std::shared_ptr<PackedHead> pack_head(const float* up, const float* down, int64_t dim,
                                      Compute compute = Compute::kFloat32);

// x, out: strided [B, P, D] views (out data written through `out_data`, out's strides); runs the
// micro-kernel the head was packed for.
void project_head_cpu(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                      const FeatureView& out, void* out_data);

// CUDA: contiguous device buffers x, out [B, P, D] of dtype; unpacked weights up [3, 2D, D], down
// [3, D, D] and the modulation in float32 on the device.
void project_head_cuda(const void* x, void* out, int64_t batch, int64_t pixels, int64_t dim, DType dtype,
                       const float* up, const float* down, const HeadModulation& mod, void* stream);

}  // namespace cleandift
