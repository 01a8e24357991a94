// CUDA matching: 64 x 64 similarity tiles in shared memory, never an N x M matrix.
//
//   inverse_norms: one warp per vector: 1 / max(||x||, eps) in fp32 (no normalised copy);
//   match_tiles:   a block owns 64 source rows and walks a range of 64-column target tiles of the
//                  RAW inputs: fp16/bf16 tiles come from tensor cores (WMMA 16x16x16: products of
//                  the stored values are exact, accumulation fp32), fp32 tiles from a 4x4-per-thread
//                  FMA tile. The epilogue scales the hot tile by both fp32 inverse norms, so no
//                  value is rounded back to fp16/bf16 after normalising (which moved near-ties), and
//                  reduces it: row best (k = 1: 64-bit keys, match_common.h; k > 1: a top-k list per
//                  row) and, for mutual NN, the column best merged with atomicMax;
//   finalize:      keys -> (index, similarity), mutual check.
// The ordering rules (ties: lowest index; NaN never wins) are the shared ones of match_common.h.
// Agreement with the CPU path (which scales by the same fp32 inverse norms before its fp32 FMA
// products): similarities within a few fp32 ulps of the dot product (accumulation order), hence the
// same argmax except where the top two differ by less than about 1e-6; bitwise-identical vectors
// still tie exactly (same products, same order), lowest index first. bf16 raw products need
// |x| < ~1e18 to stay inside fp32 (fp16 inputs always do).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#include "common/cuda_scratch.h"
#include "ops/match.h"
#include "ops/match_common.h"

namespace cleandift {
namespace {

using namespace match_detail;
namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;       // rows and columns per block tile
constexpr int kDepth = 32;      // channels per shared-memory slice
constexpr int kPad = 8;         // shared-memory row padding (bank conflicts, WMMA 32-byte alignment)
constexpr int kThreads = 256;   // 8 warps
constexpr int kMaxTopK = 32;    // k > 1 keeps the list of one row in one thread's registers/local memory

constexpr const char* kOp = "match (CUDA)";

void check(cudaError_t err, const char* what) { check_cuda(err, kOp, what); }

template <class T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// inv[row] = 1 / max(||x[row]||, eps) in fp32, one warp per row.
template <class T>
__global__ void inverse_norms(const T* __restrict__ x, float* __restrict__ inv, int64_t rows, int64_t channels) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* v = x + row * channels;
  float acc = 0.f;
  for (int64_t c = lane; c < channels; c += 32) {
    const float f = to_float(v[c]);
    acc = fmaf(f, f, acc);
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) inv[row] = inverse_norm(acc);
}

// Stage a kTile x kDepth slice of `rows` vectors (starting at `first`, channels [c0, c0+kDepth))
// into shared memory, zero-filled past the ends.
template <class T>
__device__ void load_slice(const T* __restrict__ x, int64_t rows, int64_t channels, int64_t first, int64_t c0,
                           T (*sh)[kDepth + kPad]) {
  for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
    const int r = e / kDepth, c = e % kDepth;
    const int64_t row = first + r, ch = c0 + c;
    sh[r][c] = (row < rows && ch < channels) ? x[row * channels + ch] : from_float<T>(0.f);
  }
}

// S[64][64] (+)= A_slice . B_slice^T for one kDepth slice.
template <class T>
struct TileMath;

template <>
struct TileMath<float> {  // exact fp32: each thread a 4 x 4 block of S, kept in registers
  float acc[4][4];
  __device__ void zero() {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  __device__ void mma(float (*a)[kDepth + kPad], float (*b)[kDepth + kPad]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 8
    for (int c = 0; c < kDepth; ++c) {
      float av[4], bv[4];
      for (int i = 0; i < 4; ++i) av[i] = a[ty + 16 * i][c];
      for (int j = 0; j < 4; ++j) bv[j] = b[tx + 16 * j][c];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ void store(float (*s)[kTile + kPad]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) s[ty + 16 * i][tx + 16 * j] = acc[i][j];
  }
};

template <class H>
struct TensorCoreTileMath {  // fp16 / bf16 on tensor cores: each warp two 16 x 16 fragments of S
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  __device__ void zero() {
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
  }
  __device__ void mma(H (*a)[kDepth + kPad], H (*b)[kDepth + kPad]) {
    const int warp = threadIdx.x / 32, fr = warp / 2, fc = (warp % 2) * 2;
    for (int c = 0; c < kDepth; c += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, H, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, &a[fr * 16][c], kDepth + kPad);
      for (int f = 0; f < 2; ++f) {
        // B is staged vector-major ([column][channel]): a col_major K x N operand.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, H, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, &b[(fc + f) * 16][c], kDepth + kPad);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  __device__ void store(float (*s)[kTile + kPad]) {
    const int warp = threadIdx.x / 32, fr = warp / 2, fc = (warp % 2) * 2;
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(&s[fr * 16][(fc + f) * 16], acc[f], kTile + kPad, wmma::mem_row_major);
  }
};
template <> struct TileMath<__half> : TensorCoreTileMath<__half> {};
template <> struct TileMath<__nv_bfloat16> : TensorCoreTileMath<__nv_bfloat16> {};

// grid: (row blocks, column splits, batch). Row keys / column keys are merged with atomicMax; for
// k > 1 (one column split) the block writes its rows' top-k lists directly.
template <class T>
__global__ void __launch_bounds__(kThreads) match_tiles(
    const T* __restrict__ src, const T* __restrict__ dst, const float* __restrict__ src_inv,
    const float* __restrict__ dst_inv, int64_t n, int64_t m, int64_t channels, int k, bool mutual,
    int64_t tiles_per_split, unsigned long long* __restrict__ row_keys, unsigned long long* __restrict__ col_keys,
    int64_t* __restrict__ out_index, float* __restrict__ out_sim) {
  __shared__ __align__(32) T a_sh[kTile][kDepth + kPad];
  __shared__ __align__(32) T b_sh[kTile][kDepth + kPad];
  __shared__ __align__(32) float s_sh[kTile][kTile + kPad];
  __shared__ float a_inv[kTile], b_inv[kTile];
  __shared__ unsigned long long best_sh[kTile];

  const int64_t b = blockIdx.z, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T* a = src + b * n * channels;
  const T* d = dst + b * m * channels;
  const int64_t col_tiles = (m + kTile - 1) / kTile;
  const int64_t t_begin = blockIdx.y * tiles_per_split;
  const int64_t t_end = min(col_tiles, t_begin + tiles_per_split);
  const int tid = threadIdx.x;

  float topk_v[kMaxTopK];
  int64_t topk_i[kMaxTopK];
  if (k > 1 && tid < kTile) topk_init(topk_v, topk_i, k);
  if (tid < kTile) {
    best_sh[tid] = kNoKey;
    a_inv[tid] = i0 + tid < n ? src_inv[b * n + i0 + tid] : 0.f;
  }

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const int64_t j0 = tile * kTile;
    if (tid < kTile) b_inv[tid] = j0 + tid < m ? dst_inv[b * m + j0 + tid] : 0.f;
    TileMath<T> math;
    math.zero();
    for (int64_t c0 = 0; c0 < channels; c0 += kDepth) {
      load_slice(a, n, channels, i0, c0, a_sh);
      load_slice(d, m, channels, j0, c0, b_sh);
      __syncthreads();
      math.mma(a_sh, b_sh);
      __syncthreads();
    }
    math.store(s_sh);
    __syncthreads();
    // Cosine = raw dot * both fp32 inverse norms (one product order everywhere: ties stay exact).
    for (int e = tid; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      s_sh[r][c] = s_sh[r][c] * a_inv[r] * b_inv[c];
    }
    __syncthreads();

    // Row direction: 4 threads per row, 16 columns each, then a 4-lane max of keys.
    if (k == 1) {
      const int r = tid / 4, part = tid % 4;
      unsigned long long key = kNoKey;
      for (int c = part * 16; c < part * 16 + 16; ++c) {
        const float v = s_sh[r][c];
        if (j0 + c < m && v == v) key = max(key, static_cast<unsigned long long>(match_key(v, j0 + c)));
      }
      key = max(key, __shfl_xor_sync(0xffffffffu, key, 1));
      key = max(key, __shfl_xor_sync(0xffffffffu, key, 2));
      if (part == 0) best_sh[r] = max(best_sh[r], key);
    } else if (tid < kTile) {
      for (int c = 0; c < kTile && j0 + c < m; ++c) {
        const float v = s_sh[tid][c];
        if (v >= topk_v[k - 1]) topk_insert(topk_v, topk_i, k, v, j0 + c);
      }
    }
    // Column direction (mutual): 4 threads per column, 16 rows each.
    if (mutual) {
      const int c = tid / 4, part = tid % 4;
      unsigned long long key = kNoKey;
      for (int r = part * 16; r < part * 16 + 16; ++r) {
        const float v = s_sh[r][c];
        if (i0 + r < n && v == v) key = max(key, static_cast<unsigned long long>(match_key(v, i0 + r)));
      }
      key = max(key, __shfl_xor_sync(0xffffffffu, key, 1));
      key = max(key, __shfl_xor_sync(0xffffffffu, key, 2));
      if (part == 0 && j0 + c < m && key != kNoKey) atomicMax(&col_keys[b * m + j0 + c], key);
    }
    __syncthreads();
  }

  if (tid < kTile && i0 + tid < n) {
    const int64_t row = b * n + i0 + tid;
    if (k == 1) {
      if (best_sh[tid] != kNoKey) atomicMax(&row_keys[row], best_sh[tid]);
    } else {
      for (int j = 0; j < k; ++j) {
        float v = topk_v[j];
        int64_t idx = topk_i[j];
        finalize_entry(v, idx);
        out_index[row * k + j] = idx;
        out_sim[row * k + j] = v;
      }
    }
  }
}

__global__ void finalize_rows(const unsigned long long* __restrict__ row_keys,
                              const unsigned long long* __restrict__ col_keys, int64_t batch, int64_t n, int64_t m,
                              bool mutual, int64_t* __restrict__ out_index, float* __restrict__ out_sim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= batch * n) return;
  const uint64_t key = row_keys[row];
  int64_t idx = key_index(key);
  const float v = key == kNoKey ? NAN : key_value(key);
  if (mutual) {
    const int64_t b = row / n;
    idx = mutual_index(row % n, idx, reinterpret_cast<const uint64_t*>(col_keys) + b * m);
  }
  out_index[row] = idx;
  out_sim[row] = v;
}

template <class T>
void launch(const FeatureView& src, const FeatureView& dst, const MatchOptions& opt, const MatchOutput& out,
            cudaStream_t stream) {
  const int64_t B = src.batch, N = src.rows, M = dst.rows, C = src.channels;
  if (opt.k > kMaxTopK)
    throw std::invalid_argument("match (CUDA): k <= " + std::to_string(kMaxTopK) + " on the GPU, got " +
                                std::to_string(opt.k));
  AsyncScratch scratch(stream, kOp);
  float* src_inv = scratch.alloc<float>(B * N, "allocating src inverse norms");
  float* dst_inv = scratch.alloc<float>(B * M, "allocating dst inverse norms");
  auto* row_keys = scratch.alloc<unsigned long long>(B * N, "allocating row keys");
  auto* col_keys = scratch.alloc<unsigned long long>(B * M, "allocating column keys");
  check(cudaMemsetAsync(row_keys, 0, sizeof(unsigned long long) * B * N, stream), "clearing row keys");
  check(cudaMemsetAsync(col_keys, 0, sizeof(unsigned long long) * B * M, stream), "clearing column keys");

  const int rows_per_block = kThreads / 32;
  inverse_norms<T><<<static_cast<unsigned>((B * N + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(
      static_cast<const T*>(src.data), src_inv, B * N, C);
  inverse_norms<T><<<static_cast<unsigned>((B * M + rows_per_block - 1) / rows_per_block), kThreads, 0, stream>>>(
      static_cast<const T*>(dst.data), dst_inv, B * M, C);
  check(cudaGetLastError(), "launching inverse_norms");

  // Split the columns over blocks when there are few row blocks (k = 1 only: keys merge by atomicMax).
  const int64_t row_blocks = (N + kTile - 1) / kTile, col_tiles = (M + kTile - 1) / kTile;
  int device = 0, sms = 1;
  check(cudaGetDevice(&device), "querying the device");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
  int64_t splits = 1;
  if (opt.k == 1 && row_blocks * B < 2 * sms)
    splits = std::min<int64_t>(col_tiles, (2 * sms + row_blocks * B - 1) / (row_blocks * B));
  const int64_t tiles_per_split = (col_tiles + splits - 1) / splits;
  splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  if (row_blocks > 0x7fffffff || splits > 65535 || B > 65535)
    throw std::invalid_argument("match (CUDA): problem too large for one launch (B <= 65535)");
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), static_cast<unsigned>(B));
  match_tiles<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(src.data), static_cast<const T*>(dst.data),
                                                 src_inv, dst_inv, N, M, C, opt.k, opt.mutual, tiles_per_split,
                                                 row_keys, col_keys, out.index, out.similarity);
  check(cudaGetLastError(), "launching match_tiles");
  if (opt.k == 1)
    finalize_rows<<<static_cast<unsigned>((B * N + 255) / 256), 256, 0, stream>>>(row_keys, col_keys, B, N, M,
                                                                                  opt.mutual, out.index, out.similarity);
  check(cudaGetLastError(), "launching finalize_rows");
}

}  // namespace

void match_cuda(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
                const MatchOutput& out, void* stream) {
  check_match_args(src, dst, opt);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: launch<float>(src, dst, opt, out, s); break;
    case DType::kFloat16: launch<__half>(src, dst, opt, out, s); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(src, dst, opt, out, s); break;
  }
}

}  // namespace cleandift
