// CUDA projection head: the residual stream of all pixels stays in an fp32 scratch [B*P, D]; per
// layer two fused tile kernels (exact fp32 FMA tiles, 64 x 64 per block, 4 x 4 per thread):
//   row_rinv:      1 / sqrt(mean(x^2) + eps) per pixel (one warp per pixel; AdaRMS only);
//   up_swiglu:     H = M(X) . Wv^T  (.)  silu(M(X) . Wg^T), the modulation M applied while staging A
//                  (AdaRMS: X * rinv * scale; FiLM: X * scale + shift), value and gate side by side;
//   down_residual: X += H . Wd^T.
// Input and output conversions (fp16 / bf16 / fp32) happen in the first and last kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_scratch.h"
#include "common/elements.h"
#include "ops/project_head.h"

namespace cleandift {
namespace {

constexpr int kTile = 64, kDepth = 16, kThreads = 256;

constexpr const char* kOp = "project (CUDA)";

void check(cudaError_t err, const char* what) { check_cuda(err, kOp, what); }

__global__ void load_features(const void* __restrict__ x, DType dtype, float* __restrict__ xs, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) xs[i] = load_as_float(x, i, dtype);
}

__global__ void store_features(const float* __restrict__ xs, DType dtype, void* __restrict__ out, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(out)[i] = float_to_fp16_bits(xs[i]); break;
    case DType::kBFloat16: static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(xs[i]); break;
    default: static_cast<float*>(out)[i] = xs[i];
  }
}

__global__ void row_rinv(const float* __restrict__ xs, float* __restrict__ rinv, int64_t rows, int64_t dim) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.f;
  for (int64_t d = lane; d < dim; d += 32) acc += xs[row * dim + d] * xs[row * dim + d];
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) rinv[row] = rsqrtf(acc / static_cast<float>(dim) + kHeadEps);
}

// Stage rows [first, first + 64) x channels [k0, k0 + kDepth) of a row-major [rows, depth] matrix,
// optionally modulated per channel of the row's batch element: times scale (and rinv per row when
// given: AdaRMS), plus shift when given (FiLM).
__device__ void stage(const float* __restrict__ m, int64_t rows, int64_t depth, int64_t first, int64_t k0,
                      const float* __restrict__ rinv, const float* __restrict__ scale,
                      const float* __restrict__ shift, int64_t pixels, float (*sh)[kTile + 4]) {
  for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
    const int r = e / kDepth, c = e % kDepth;
    const int64_t row = first + r, k = k0 + c;
    float v = 0.f;
    if (row < rows && k < depth) {
      v = m[row * depth + k];
      if (scale) {
        const int64_t at = (row / pixels) * depth + k;
        v = rinv ? v * (scale[at] * rinv[row]) : v * scale[at];
        if (shift) v += shift[at];
      }
    }
    sh[c][r] = v;  // transposed: [k][row], conflict-free reads below
  }
}

__global__ void __launch_bounds__(kThreads) up_swiglu(const float* __restrict__ xs, const float* __restrict__ rinv,
                                                       const float* __restrict__ scale, const float* __restrict__ shift,
                                                       const float* __restrict__ w_up, float* __restrict__ h,
                                                       int64_t rows, int64_t pixels, int64_t dim) {
  __shared__ float a_sh[kDepth][kTile + 4], v_sh[kDepth][kTile + 4], g_sh[kDepth][kTile + 4];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float av[4][4] = {}, ag[4][4] = {};
  for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
    stage(xs, rows, dim, i0, k0, rinv, scale, shift, pixels, a_sh);
    stage(w_up, dim, dim, n0, k0, nullptr, nullptr, nullptr, 1, v_sh);               // value rows [0, D)
    stage(w_up + dim * dim, dim, dim, n0, k0, nullptr, nullptr, nullptr, 1, g_sh);   // gate rows [D, 2D)
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kDepth; ++c)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          av[i][j] = fmaf(a_sh[c][ty + 16 * i], v_sh[c][tx + 16 * j], av[i][j]);
          ag[i][j] = fmaf(a_sh[c][ty + 16 * i], g_sh[c][tx + 16 * j], ag[i][j]);
        }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t row = i0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (row < rows && n < dim) h[row * dim + n] = av[i][j] * (ag[i][j] / (1.f + expf(-ag[i][j])));
    }
}

__global__ void __launch_bounds__(kThreads) down_residual(const float* __restrict__ h, const float* __restrict__ w_down,
                                                           float* __restrict__ xs, int64_t rows, int64_t dim) {
  __shared__ float a_sh[kDepth][kTile + 4], b_sh[kDepth][kTile + 4];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile, n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < dim; k0 += kDepth) {
    stage(h, rows, dim, i0, k0, nullptr, nullptr, nullptr, 1, a_sh);
    stage(w_down, dim, dim, n0, k0, nullptr, nullptr, nullptr, 1, b_sh);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kDepth; ++c)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a_sh[c][ty + 16 * i], b_sh[c][tx + 16 * j], acc[i][j]);
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t row = i0 + ty + 16 * i, n = n0 + tx + 16 * j;
      if (row < rows && n < dim) xs[row * dim + n] += acc[i][j];
    }
}

}  // namespace

void project_head_cuda(const void* x, void* out, int64_t batch, int64_t pixels, int64_t dim, DType dtype,
                       const float* up, const float* down, const HeadModulation& mod, void* stream_ptr) {
  if (batch <= 0 || pixels <= 0 || dim <= 0) throw std::invalid_argument("project: empty input");
  check_modulation(mod);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool film = mod.conditioning == HeadConditioning::kFilm;
  const int64_t rows = batch * pixels, count = rows * dim;
  if ((rows + kTile - 1) / kTile > 0x7fffffff || (dim + kTile - 1) / kTile > 65535)
    throw std::invalid_argument("project (CUDA): problem too large for one launch");
  AsyncScratch scratch(stream, kOp);
  float* xs = scratch.alloc<float>(count, "allocating the residual stream");
  float* h = scratch.alloc<float>(count, "allocating the SwiGLU buffer");
  float* rinv = film ? nullptr : scratch.alloc<float>(rows, "allocating RMS statistics");
  const unsigned elem_blocks = static_cast<unsigned>((count + 255) / 256);
  load_features<<<elem_blocks, 256, 0, stream>>>(x, dtype, xs, count);
  const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile), static_cast<unsigned>((dim + kTile - 1) / kTile));
  for (int layer = 0; layer < kHeadLayers; ++layer) {
    const int64_t at = layer * batch * dim;
    if (!film) row_rinv<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(xs, rinv, rows, dim);
    up_swiglu<<<grid, kThreads, 0, stream>>>(xs, rinv, mod.scale + at, film ? mod.shift + at : nullptr,
                                             up + layer * 2 * dim * dim, h, rows, pixels, dim);
    down_residual<<<grid, kThreads, 0, stream>>>(h, down + layer * dim * dim, xs, rows, dim);
  }
  store_features<<<elem_blocks, 256, 0, stream>>>(xs, dtype, out, count);
  check(cudaGetLastError(), "launching the head kernels");
}

}  // namespace cleandift
