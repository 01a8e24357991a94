// The CPU projection-head driver, templated on a register-tile micro-kernel (micro_kernels.h).
// OpenMP over (batch, tiles of TP pixels, up to 32 register tiles); per tile, for each layer:
//   modulated rows packed as A panels (AdaRMS: RMS statistics, then normalised and scaled rows;
//   FiLM: scaled and shifted rows);
//   up-projection value and gate panels side by side, SwiGLU in the epilogue, written straight into
//   the A-panel layout of the down-projection; down-projection with the residual add in the epilogue.
// The tile's residual stream stays in fp32 between layers; with the bf16 micro-kernel the weights
// and both GEMMs' A panels are bf16 (rounded to nearest even), their products summed in fp32.
// Included once per ISA.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common/elements.h"
#include "ops/cpu/micro_kernels.h"
#include "ops/project_head.h"

namespace cleandift {
namespace {

// Zeroed, 64-byte aligned storage for `count` elements of T.
template <class T = float>
std::shared_ptr<T> aligned_zeros(int64_t count) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::shared_ptr<T>(static_cast<T*>(p), std::free);
}

template <class Micro>
std::shared_ptr<PackedHead> pack_head_for(const float* up, const float* down, int64_t dim) {
  constexpr int NR = Micro::NR;
  using Elem = typename Micro::Elem;
  auto head = std::make_shared<PackedHead>();
  head->dim = dim;
  head->nr = NR;
  head->isa = Micro::isa;
  const int64_t panels = (dim + NR - 1) / NR, dp = panels * NR, dk = padded_depth<Micro>(dim);
  head->dim_padded = dp;
  head->depth = dk;
  for (int layer = 0; layer < kHeadLayers; ++layer) {
    const float* w_up = up + static_cast<int64_t>(layer) * 2 * dim * dim;
    const float* w_down = down + static_cast<int64_t>(layer) * dim * dim;
    auto pu = aligned_zeros<Elem>(2 * panels * dk * NR), pd = aligned_zeros<Elem>(panels * dp * NR);
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < panels; ++q) {
      Elem* value = pu.get() + (2 * q) * dk * NR;
      Elem* gate = value + dk * NR;
      Elem* dn = pd.get() + q * dp * NR;
      for (int n = 0; n < NR && q * NR + n < dim; ++n) {
        const int64_t o = q * NR + n;
        for (int64_t k = 0; k < dim; ++k) {
          value[panel_offset<Micro::kBGroup>(k, n, NR)] = to_panel<Elem>(w_up[o * dim + k]);
          gate[panel_offset<Micro::kBGroup>(k, n, NR)] = to_panel<Elem>(w_up[(dim + o) * dim + k]);
          dn[panel_offset<Micro::kBGroup>(k, n, NR)] = to_panel<Elem>(w_down[o * dim + k]);
        }
      }
    }
    head->up.push_back(pu);
    head->down.push_back(pd);
  }
  return head;
}

// exp(x) by Cephes' expf polynomial (about 1e-7 relative), branch-free so the SwiGLU loop
// vectorises (libm's expf is a scalar call). NaN propagates.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  return y * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

template <class Micro, DType DT>
void project_head_typed(const PackedHead& head, const FeatureView& x, const HeadModulation& mod,
                        const FeatureView& out, void* out_data) {
  constexpr int MR = Micro::MR, NR = Micro::NR;
  using Elem = typename Micro::Elem;
  constexpr int64_t kDepthBlock = (16 << 10) / (NR * sizeof(Elem));  // KC: a KC x NR weight slice fills half of L1
  static_assert(kDepthBlock % Micro::kDepthStep == 0, "slices hold whole depth steps");
  // Up to 32 * MR pixels share one pass over the weights (every tile streams all of them: 59 MB at
  // D = 1280); 32 ran 4-6% faster than 16 at D = 1280 in tuning runs, the same at D = 320. AMX's
  // 32-pixel panels: 12, the AVX-512 kernels' 384 pixels (bf16 A panels of 1 MB at D = 1280).
  constexpr int64_t kMaxTilePanels = MR >= 32 ? 12 : 32;
  // The down GEMM's A panel is written NR depths at a time (one up-projection panel's outputs).
  static_assert(NR % Micro::kAGroup == 0, "an output panel must fill whole A-panel depth groups");
  const int64_t B = x.batch, P = x.rows, D = head.dim, Dp = head.dim_padded, Dk = head.depth;
  // Bigger tiles stream the weights fewer times; keep >= 4 tiles per thread for balance.
  const int64_t want = (B * P + 4 * omp_get_max_threads() - 1) / (4 * omp_get_max_threads());
  const int64_t tile_panels = std::clamp<int64_t>((want + MR - 1) / MR, 1, kMaxTilePanels);
  const int64_t TP = tile_panels * MR;
  const int64_t panels = Dp / NR;
  const int64_t tiles = (P + TP - 1) / TP;
  const bool film = mod.conditioning == HeadConditioning::kFilm;

#pragma omp parallel
  {
    [[maybe_unused]] const typename Micro::Scope micro_scope;  // AMX: this thread's tile configuration
    auto xs = aligned_zeros<float>(TP * D);       // residual stream of the tile, fp32
    auto ap = aligned_zeros<Elem>(TP * Dk);  // A panels of the up-projection, Dk * MR each
    auto hp = aligned_zeros<Elem>(TP * Dp);  // A panels of the down-projection, Dp * MR each
    auto tv = aligned_zeros<float>(tile_panels * MR * NR), tg = aligned_zeros<float>(tile_panels * MR * NR);
    std::vector<float> rinv(TP);

#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * tiles; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * TP;
      const int64_t rows = std::min(TP, P - p0), row_panels = (rows + MR - 1) / MR;
      for (int64_t r = 0; r < TP; ++r)
        for (int64_t d = 0; d < D; ++d)
          xs.get()[r * D + d] = r < rows ? load_elem<DT>(x.data, b * x.stride_batch + (p0 + r) * x.stride_row +
                                                                     d * x.stride_channel)
                                         : 0.f;
      for (int layer = 0; layer < kHeadLayers; ++layer) {
        const int64_t at = (static_cast<int64_t>(layer) * B + b) * D;
        const float* scale = mod.scale + at;
        // The modulated rows as A panels; depths D..Dk stay zero (allocated zeroed, never written).
        auto pack_rows = [&](auto modulate) {
          for (int64_t rp = 0; rp < row_panels; ++rp) {
            Elem* a = ap.get() + rp * Dk * MR;
            for (int64_t d = 0; d < D; ++d)
              for (int r = 0; r < MR; ++r)
                a[panel_offset<Micro::kAGroup>(d, r, MR)] =
                    to_panel<Elem>(modulate(xs.get()[(rp * MR + r) * D + d], d, rp * MR + r));
          }
        };
        if (film) {
          const float* shift = mod.shift + at;
          pack_rows([&](float v, int64_t d, int64_t) { return v * scale[d] + shift[d]; });
        } else {
          for (int64_t r = 0; r < row_panels * MR; ++r) {
            const float* row = xs.get() + r * D;
            float acc = 0.f;
            for (int64_t d = 0; d < D; ++d) acc += row[d] * row[d];
            rinv[r] = 1.f / std::sqrt(acc / static_cast<float>(D) + kHeadEps);
          }
          pack_rows([&](float v, int64_t d, int64_t r) { return v * (scale[d] * rinv[r]); });
        }
        const Elem* up = static_cast<const Elem*>(head.up[layer].get());
        for (int64_t q = 0; q < panels; ++q) {
          // KC-deep slices: the value and gate slices stay in L1 while every row panel uses them.
          for (int64_t k0 = 0; k0 < Dk; k0 += kDepthBlock) {
            const int64_t kc = std::min(kDepthBlock, Dk - k0);
            for (int64_t rp = 0; rp < row_panels; ++rp) {
              const Elem* a = ap.get() + rp * Dk * MR + k0 * MR;
              Micro::run(a, up + 2 * q * Dk * NR + k0 * NR, kc, tv.get() + rp * MR * NR, k0 > 0);
              Micro::run(a, up + (2 * q + 1) * Dk * NR + k0 * NR, kc, tg.get() + rp * MR * NR, k0 > 0);
            }
          }
          for (int64_t rp = 0; rp < row_panels; ++rp) {
            float* v = tv.get() + rp * MR * NR;
            const float* g = tg.get() + rp * MR * NR;
            for (int i = 0; i < MR * NR; ++i) v[i] *= g[i] / (1.f + exp_poly(-g[i]));  // SwiGLU
            Elem* h = hp.get() + rp * Dp * MR + q * NR * MR;  // depth q*NR.. of the down GEMM's A panel
            for (int r = 0; r < MR; ++r)
              for (int n = 0; n < NR; ++n) h[panel_offset<Micro::kAGroup>(n, r, MR)] = to_panel<Elem>(v[r * NR + n]);
          }
        }
        const Elem* down = static_cast<const Elem*>(head.down[layer].get());
        for (int64_t q = 0; q < panels; ++q) {
          const int64_t valid = std::min<int64_t>(NR, D - q * NR);
          for (int64_t k0 = 0; k0 < Dp; k0 += kDepthBlock) {
            const int64_t kc = std::min(kDepthBlock, Dp - k0);
            for (int64_t rp = 0; rp < row_panels; ++rp)
              Micro::run(hp.get() + rp * Dp * MR + k0 * MR, down + q * Dp * NR + k0 * NR, kc,
                         tv.get() + rp * MR * NR, k0 > 0);
          }
          for (int64_t rp = 0; rp < row_panels; ++rp) {
            const float* t = tv.get() + rp * MR * NR;
            for (int r = 0; r < MR; ++r)
              for (int64_t n = 0; n < valid; ++n) xs.get()[(rp * MR + r) * D + q * NR + n] += t[r * NR + n];
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d)
          store_elem<DT>(out_data, b * out.stride_batch + (p0 + r) * out.stride_row + d * out.stride_channel,
                         xs.get()[r * D + d]);
    }
  }
}

template <class Micro>
void project_head_for(const PackedHead& head, const FeatureView& x, DType dtype, const HeadModulation& mod,
                      const FeatureView& out, void* out_data) {
  switch (dtype) {
    case DType::kFloat32: project_head_typed<Micro, DType::kFloat32>(head, x, mod, out, out_data); break;
    case DType::kFloat16: project_head_typed<Micro, DType::kFloat16>(head, x, mod, out, out_data); break;
    case DType::kBFloat16: project_head_typed<Micro, DType::kBFloat16>(head, x, mod, out, out_data); break;
  }
}

}  // namespace
}  // namespace cleandift
