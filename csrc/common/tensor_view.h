// Types every op shares: what the buffers hold (DType), what the CPU kernels multiply in (Compute),
// and how a [B, rows, C] buffer is addressed (FeatureView).
#pragma once
#include <cstdint>

namespace cleandift {

// Element types the kernels read; the computation is fp32 (tensor cores: fp16/bf16 in, fp32 acc).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What the CPU kernels multiply in: fp32, or bf16 (inputs rounded to bf16 after any fp32
// normalisation; products summed in fp32). bf16 runs only where the CPU has it natively
// (cpu_isa, common/cpu_features.h); it is never emulated.
enum class Compute : int { kFloat32 = 0, kBFloat16 = 1 };

// A strided [B, rows, C] view; strides are in elements (the [B, C, h, w] layout is the view
// with strides (C*h*w, 1, h*w), read in place).
struct FeatureView {
  const void* data = nullptr;
  int64_t batch = 0, rows = 0, channels = 0;
  int64_t stride_batch = 0, stride_row = 0, stride_channel = 0;
};

}  // namespace cleandift
