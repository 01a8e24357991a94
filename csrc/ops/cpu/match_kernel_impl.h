// The CPU matching driver, templated on a register-tile micro-kernel `Micro` (MR x NR floats):
//
//   1. one pass over src and dst: inverse norms (+ NaN/Inf check);
//   2. per batch: dst normalised once and packed into NR-column panels of C x NR elements, src
//      into MR-row panels of C x MR (as Micro::Elem: fp32, or bf16 rounded from the normalised
//      fp32 vectors, in the micro-kernel's depth groups: panel_offset; similarities accumulate in
//      fp32 either way);
//   3. OpenMP over (row block of MC source vectors, column chunk): for every dst panel the MC x NR
//      similarity block is accumulated over KC-deep channel slices (the B slice stays in L1, the A
//      block in L2) and reduced while it is hot: row argmax / top-k and, for mutual NN, the column max.
//   4. per-row results of the column chunks and per-thread column maxima are merged (ties: lowest
//      index, match_common.h).
//
// Included by exactly one translation unit per ISA; everything is in an anonymous namespace so the
// differently-compiled copies never meet at link time.
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "ops/cpu/micro_kernels.h"
#include "ops/match.h"
#include "ops/match_common.h"

namespace cleandift {
namespace {

using namespace match_detail;

constexpr int64_t kSliceBytes = 16 << 10;     // KC x NR fp32 B slice: half of L1, next to the A slice
constexpr int64_t kTasksPerThread = 16;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedBuffer = std::unique_ptr<T[], FreeDeleter>;

template <class T>
AlignedBuffer<T> aligned_buffer(int64_t count) {
  size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return AlignedBuffer<T>(static_cast<T*>(p));
}

template <class F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(std::integral_constant<DType, DType::kFloat32>{}); break;
    case DType::kFloat16: f(std::integral_constant<DType, DType::kFloat16>{}); break;
    case DType::kBFloat16: f(std::integral_constant<DType, DType::kBFloat16>{}); break;
  }
}

// Inverse L2 norms of every [b, row] vector (accumulated in double), into inv[b * rows + row];
// `first_bad` gets the flat (b, row, c) position of the first NaN / Inf. Called inside a parallel
// region (work-shared, no barrier: few barriers matter when the cores are shared).
template <DType D>
void inverse_norms(const FeatureView& v, bool check_finite, float* inv, std::atomic<int64_t>& first_bad) {
  constexpr int64_t kRows = 16;  // rows per block: channel-strided layouts then read whole lines
  const int64_t blocks = (v.rows + kRows - 1) / kRows;
#pragma omp for schedule(dynamic, 4) nowait
  for (int64_t task = 0; task < v.batch * blocks; ++task) {
    const int64_t b = task / blocks, r0 = (task % blocks) * kRows;
    const int64_t nr = std::min(kRows, v.rows - r0);
    const int64_t base = b * v.stride_batch + r0 * v.stride_row;
    double acc[kRows] = {0};
    bool bad = false;
    if (v.stride_channel == 1) {  // contiguous vectors: 8 partial sums per vector (vectorisable)
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t off = base + r * v.stride_row;
        double part[8] = {0};
        int64_t c = 0;
        for (; c + 8 <= v.channels; c += 8)
          for (int j = 0; j < 8; ++j) {
            const double x = load_elem<D>(v.data, off + c + j);
            part[j] += x * x;
          }
        for (; c < v.channels; ++c) {
          const double x = load_elem<D>(v.data, off + c);
          part[0] += x * x;
        }
        acc[r] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      }
    } else {  // channel-strided ([B, C, h, w]): a block of vectors per channel, whole cache lines
      for (int64_t c = 0; c < v.channels; ++c) {
        for (int64_t r = 0; r < nr; ++r) {
          const float x = load_elem<D>(v.data, base + r * v.stride_row + c * v.stride_channel);
          acc[r] += static_cast<double>(x) * x;
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      inv[b * v.rows + r0 + r] = inverse_norm(acc[r]);
      bad = bad || !std::isfinite(acc[r]);
    }
    if (check_finite && bad) {  // locate the element (rare path, plain scan)
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t c = 0; c < v.channels; ++c) {
          const float x = load_elem<D>(v.data, base + r * v.stride_row + c * v.stride_channel);
          if (!std::isfinite(x)) {
            const int64_t flat = ((b * v.rows) + r0 + r) * v.channels + c;
            int64_t cur = first_bad.load();
            while (flat < cur && !first_bad.compare_exchange_weak(cur, flat)) {}
            r = nr;
            break;
          }
        }
      }
    }
  }
}

[[noreturn]] void throw_nonfinite(const FeatureView& v, const char* name, int64_t flat) {
  const int64_t c = flat % v.channels, row = (flat / v.channels) % v.rows, b = flat / v.channels / v.rows;
  throw std::domain_error(std::string(name) + " contains NaN or Inf (first at batch " + std::to_string(b) +
                          ", vector " + std::to_string(row) + ", channel " + std::to_string(c) +
                          "); clean the features or pass allow_nonfinite=True (NaN similarities never win)");
}

// A normalised, zero-padded panel of Width vectors over `depth` (>= C) channels: lane w, depth c
// holds x[first + w, c] * inv (in the micro-kernel's element type, Group depths per lane run).
template <class Micro, DType D, int Width, int Group>
void pack_panel(const FeatureView& v, int64_t b, int64_t first, const float* inv, int64_t depth,
                typename Micro::Elem* out) {
  using Elem = typename Micro::Elem;
  const int64_t valid = std::min<int64_t>(Width, v.rows - first);
  const int64_t base = b * v.stride_batch + first * v.stride_row;
  float scale[Width];
  for (int w = 0; w < Width; ++w) scale[w] = w < valid ? inv[b * v.rows + first + w] : 0.f;
  for (int64_t c = 0; c < depth; ++c) {
    for (int64_t w = 0; w < Width; ++w) {
      const float x = c < v.channels && w < valid
          ? load_elem<D>(v.data, base + w * v.stride_row + c * v.stride_channel) * scale[w] : 0.f;
      out[panel_offset<Group>(c, w, Width)] = to_panel<Elem>(x);
    }
  }
}

struct RowResult {
  float value;
  int64_t index;
};

template <class Micro>
void run_match(const FeatureView& src, const FeatureView& dst, DType dtype, const MatchOptions& opt,
               const MatchOutput& out) {
  constexpr int MR = Micro::MR, NR = Micro::NR;
  using Elem = typename Micro::Elem;
  constexpr int64_t kChannelBlock = kSliceBytes / (NR * sizeof(Elem));  // KC
  static_assert(kChannelBlock % Micro::kDepthStep == 0, "slices hold whole depth steps");
  const int64_t B = src.batch, N = src.rows, M = dst.rows;
  const int64_t C = padded_depth<Micro>(src.channels);  // panel depth: zero channels pad the last step
  const int k = opt.k;

  std::vector<float> inv_src(B * N), inv_dst(B * M);
  std::atomic<int64_t> bad_src{INT64_MAX}, bad_dst{INT64_MAX};
#pragma omp parallel
  with_dtype(dtype, [&](auto d) {
    inverse_norms<decltype(d)::value>(src, opt.check_finite, inv_src.data(), bad_src);
    inverse_norms<decltype(d)::value>(dst, opt.check_finite, inv_dst.data(), bad_dst);
  });
  if (opt.check_finite && bad_src.load() != INT64_MAX) throw_nonfinite(src, "src", bad_src.load());
  if (opt.check_finite && bad_dst.load() != INT64_MAX) throw_nonfinite(dst, "dst", bad_dst.load());

  const int threads = omp_get_max_threads();
  const int64_t panels = (M + NR - 1) / NR;
  // Row block: as many register tiles of rows as fill this core's L2 with the packed block
  // (4..16 tiles; more rows reuse every streamed dst panel more), fewer when N is small. The
  // whole L2 ran 5-11% faster than half of it at C = 1280 here (interleaved A/B runs), no change below.
  const int64_t tiles_in_l2 = std::clamp<int64_t>(cpu_features().l2_bytes / (MR * C * sizeof(Elem)), 4, 16);
  const int64_t mc = std::min<int64_t>(tiles_in_l2 * MR, (N + MR - 1) / MR * MR);
  const int64_t row_blocks = (N + mc - 1) / mc;
  // Split the columns too when there are few row blocks: >= kTasksPerThread dynamic tasks per thread
  // keep the tail short when threads share the cores with other work.
  const int64_t want_tasks = kTasksPerThread * threads;
  const int64_t col_chunks = row_blocks >= want_tasks ? 1
      : std::clamp<int64_t>((want_tasks + row_blocks - 1) / row_blocks, 1, std::max<int64_t>(panels / 4, 1));
  const int64_t panels_per_chunk = (panels + col_chunks - 1) / col_chunks;
  const int64_t tasks = row_blocks * col_chunks;

  const int64_t src_panels = (N + MR - 1) / MR;
  auto packed_dst = aligned_buffer<Elem>(panels * C * NR);
  auto packed_src = aligned_buffer<Elem>(src_panels * C * MR);  // whole batch: column chunks share it
  std::vector<RowResult> chunk_rows(static_cast<size_t>(col_chunks) * N * k);
  // Column maxima (mutual): one array per thread, merged after each batch.
  std::vector<uint64_t> col_keys(opt.mutual ? static_cast<size_t>(threads) * M : 0);

  for (int64_t b = 0; b < B; ++b) {
    std::fill(col_keys.begin(), col_keys.end(), kNoKey);
#pragma omp parallel num_threads(threads)
    {
      with_dtype(dtype, [&](auto d) {
#pragma omp for schedule(dynamic, 8)
        for (int64_t p = 0; p < panels + src_panels; ++p) {
          if (p < panels)
            pack_panel<Micro, decltype(d)::value, NR, Micro::kBGroup>(dst, b, p * NR, inv_dst.data(), C,
                                                                      packed_dst.get() + p * C * NR);
          else
            pack_panel<Micro, decltype(d)::value, MR, Micro::kAGroup>(src, b, (p - panels) * MR, inv_src.data(), C,
                                                                      packed_src.get() + (p - panels) * C * MR);
        }
      });
      [[maybe_unused]] const typename Micro::Scope micro_scope;  // AMX: this thread's tile configuration
      const int tid = omp_get_thread_num();
      uint64_t* ckeys = opt.mutual ? col_keys.data() + static_cast<size_t>(tid) * M : nullptr;
      auto tiles = aligned_buffer<float>(mc * NR);                     // the MC x NR block
      auto lane_value = aligned_buffer<float>(k == 1 ? mc * NR : 0);   // k = 1: per-lane row best
      auto lane_index = aligned_buffer<int32_t>(k == 1 ? mc * NR : 0);
      std::vector<float> topk_value(k > 1 ? mc * k : 0);
      std::vector<int64_t> topk_index(k > 1 ? mc * k : 0);

#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t rb = task / col_chunks, chunk = task % col_chunks;
        const int64_t i0 = rb * mc, rows = std::min(mc, N - i0);
        const int64_t row_panels = (rows + MR - 1) / MR;
        const int64_t p_begin = chunk * panels_per_chunk, p_end = std::min(panels, p_begin + panels_per_chunk);
        const Elem* block = packed_src.get() + (i0 / MR) * C * MR;  // mc is a multiple of MR
        if (k == 1) {
          std::fill(lane_value.get(), lane_value.get() + rows * NR, -INFINITY);
          std::fill(lane_index.get(), lane_index.get() + rows * NR, INT32_MAX);
        } else {
          for (int64_t r = 0; r < rows; ++r) topk_init(&topk_value[r * k], &topk_index[r * k], k);
        }

        for (int64_t p = p_begin; p < p_end; ++p) {
          const Elem* bpanel = packed_dst.get() + p * C * NR;
          const int64_t j0 = p * NR;
          const int valid_cols = static_cast<int>(std::min<int64_t>(NR, M - j0));
          for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
            const int64_t kc = std::min(kChannelBlock, C - c0);
            for (int64_t rp = 0; rp < row_panels; ++rp)
              Micro::run(block + rp * C * MR + c0 * MR, bpanel + c0 * NR, kc,
                         tiles.get() + rp * MR * NR, c0 > 0);
          }
          // Epilogue on the hot block: padded columns can never win.
          if (valid_cols < NR)
            for (int64_t r = 0; r < rows; ++r)
              std::fill(tiles.get() + r * NR + valid_cols, tiles.get() + (r + 1) * NR, -INFINITY);
          // Row (and, for mutual NN, column) maxima in one sweep over the block's rows; rows and
          // columns only increase within a task, so strict > keeps the lowest index.
          float col_v[NR];
          int32_t col_i[NR];
          for (int l = 0; l < NR; ++l) {
            col_v[l] = -INFINITY;
            col_i[l] = INT32_MAX;
          }
          for (int64_t r = 0; r < rows; ++r) {
            const float* t = tiles.get() + r * NR;
            if (k == 1) {
              float* bv = lane_value.get() + r * NR;
              int32_t* bi = lane_index.get() + r * NR;
              for (int l = 0; l < NR; ++l) {
                const bool m = t[l] > bv[l];
                bv[l] = m ? t[l] : bv[l];
                bi[l] = m ? static_cast<int32_t>(j0 + l) : bi[l];
              }
            } else {
              float* tv = &topk_value[r * k];
              int64_t* ti = &topk_index[r * k];
              for (int l = 0; l < valid_cols; ++l)
                if (t[l] >= tv[k - 1]) topk_insert(tv, ti, k, t[l], j0 + l);
            }
            if (opt.mutual) {
              for (int l = 0; l < NR; ++l) {
                const bool m = t[l] > col_v[l];
                col_v[l] = m ? t[l] : col_v[l];
                col_i[l] = m ? static_cast<int32_t>(i0 + r) : col_i[l];
              }
            }
          }
          if (opt.mutual)
            for (int l = 0; l < valid_cols; ++l)
              if (col_i[l] != INT32_MAX) ckeys[j0 + l] = std::max(ckeys[j0 + l], match_key(col_v[l], col_i[l]));
        }

        RowResult* res = chunk_rows.data() + (chunk * N + i0) * k;
        for (int64_t r = 0; r < rows; ++r) {
          if (k == 1) {
            float v = -INFINITY;
            int64_t idx = INT64_MAX;
            for (int l = 0; l < NR; ++l) {
              const int32_t li = lane_index[r * NR + l];
              if (li != INT32_MAX && better(lane_value[r * NR + l], li, v, idx)) {
                v = lane_value[r * NR + l];
                idx = li;
              }
            }
            res[r] = {v, idx};
          } else {
            for (int j = 0; j < k; ++j) res[r * k + j] = {topk_value[r * k + j], topk_index[r * k + j]};
          }
        }
      }
    }  // omp parallel

    // Merge the column chunks of every row, then the per-thread column maxima (serial: O(N + M)
    // work is not worth another barrier).
    int64_t* out_index = out.index + b * N * k;
    float* out_sim = out.similarity + b * N * k;
    std::vector<int64_t> head(col_chunks);  // k-way merge of the chunks' sorted lists: O(k * chunks)
    for (int64_t i = 0; i < N; ++i) {
      std::fill(head.begin(), head.end(), 0);
      for (int j = 0; j < k; ++j) {
        float v = -INFINITY;
        int64_t idx = INT64_MAX, from = -1;
        for (int64_t chunk = 0; chunk < col_chunks; ++chunk) {
          if (head[chunk] == k) continue;
          const RowResult& r = chunk_rows[(chunk * N + i) * k + head[chunk]];
          if (r.index != INT64_MAX && better(r.value, r.index, v, idx)) {
            v = r.value;
            idx = r.index;
            from = chunk;
          }
        }
        if (from >= 0) ++head[from];
        finalize_entry(v, idx);
        out_index[i * k + j] = idx;
        out_sim[i * k + j] = v;
      }
    }
    if (opt.mutual) {
      for (int64_t j = 0; j < M; ++j)
        for (int t = 1; t < threads; ++t) col_keys[j] = std::max(col_keys[j], col_keys[static_cast<size_t>(t) * M + j]);
      for (int64_t i = 0; i < N; ++i) out_index[i] = mutual_index(i, out_index[i], col_keys.data());
    }
  }
}

}  // namespace
}  // namespace cleandift
