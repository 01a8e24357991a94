// The one pybind11 file: argument conversion and registration only; ops live in csrc/ops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cpu_features.h"
#include "common/cuda_info.h"
#include "ops/cpu/amx_tiles.h"
#include "ops/match.h"
#include "ops/project_head.h"

namespace py = pybind11;
using namespace cleandift;

namespace {

// "float32" | "float16" | "bfloat16".
DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("unsupported dtype '" + name + "': use float32, float16 or bfloat16");
}

// The dtype of a host buffer, which must have its item size (bf16 arrives as a 16-bit integer view:
// numpy has no bf16).
DType parse_dtype(const std::string& name, const py::array& buffer) {
  const DType d = parse_dtype(name);
  const size_t expected = d == DType::kFloat32 ? 4 : 2;
  if (static_cast<size_t>(buffer.itemsize()) != expected)
    throw std::invalid_argument("buffer item size " + std::to_string(buffer.itemsize()) + " does not match dtype " +
                                name);
  return d;
}

// "float32" | "bfloat16": what the CPU kernels multiply in.
Compute parse_compute(const std::string& name) {
  if (name == "float32") return Compute::kFloat32;
  if (name == "bfloat16") return Compute::kBFloat16;
  throw std::invalid_argument("unsupported compute '" + name + "': use float32 or bfloat16");
}

// The name of the kernel cpu_isa picks for `compute`, or None.
py::object kernel_name(Compute compute) {
  const auto isa = cpu_isa(compute);
  return isa ? py::object(py::str(cpu_isa_name(*isa))) : py::object(py::none());
}

py::object forced_kernel_name() {
  const char* env = std::getenv("CLEANDIFT_CPU_KERNEL");
  return env && *env ? py::object(py::str(env)) : py::object(py::none());
}

HeadConditioning parse_conditioning(const std::string& name) {
  if (name == "adarms") return HeadConditioning::kAdaRms;
  if (name == "film") return HeadConditioning::kFilm;
  throw std::invalid_argument("unknown head conditioning '" + name + "': use adarms or film");
}

// A [B, rows, C] array of any strides (in place; the [B, C, h, w] layout arrives as such a view).
FeatureView feature_view(const py::array& a, const char* name) {
  if (a.ndim() != 3)
    throw std::invalid_argument(std::string(name) + " must have rank 3 [B, N, C], got rank " + std::to_string(a.ndim()));
  FeatureView v;
  v.data = a.data();
  v.batch = a.shape(0), v.rows = a.shape(1), v.channels = a.shape(2);
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  for (int d = 0; d < 3; ++d)
    if (a.strides(d) % item != 0 || a.strides(d) < 0)
      throw std::invalid_argument(std::string(name) + " has negative or misaligned strides; pass a copy");
  v.stride_batch = a.strides(0) / item, v.stride_row = a.strides(1) / item, v.stride_channel = a.strides(2) / item;
  return v;
}

FeatureView device_view(uintptr_t ptr, int64_t batch, int64_t rows, int64_t channels) {
  FeatureView v;
  v.data = reinterpret_cast<const void*>(ptr);
  v.batch = batch, v.rows = rows, v.channels = channels;
  v.stride_batch = rows * channels, v.stride_row = channels, v.stride_channel = 1;
  return v;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "cleandift-rt native kernels (CPU with run-time SIMD dispatch; CUDA when compiled)";

  m.def("build_info", [] {
    py::dict d;
    d["compiler"] = CLEANDIFT_COMPILER;
    d["simd"] = cpu_feature_names();
    d["l2_cache_bytes"] = cpu_features().l2_bytes;  // sizes the matching kernel's row blocks
    CudaInfo cuda = cuda_info();
    d["cuda_compiled"] = cuda.compiled;
    d["cuda_archs"] = cuda.archs;
    d["cuda_toolkit"] = cuda.toolkit_version;
    d["cuda_driver_version"] = cuda.driver_version;
    d["cuda_status"] = cuda.status;
    py::list devices;
    for (const auto& dev : cuda.devices) {
      py::dict dd;
      dd["index"] = dev.index;
      dd["name"] = dev.name;
      dd["capability"] = std::to_string(dev.major) + "." + std::to_string(dev.minor);
      dd["total_memory"] = dev.total_memory;
      devices.append(dd);
    }
    d["cuda_devices"] = devices;
    // Both ops dispatch through cpu_isa, so match's kernels name project's too. A CLEANDIFT_CPU_KERNEL
    // this CPU cannot run leaves its kernel None and says why in cpu_kernel_error.
    d["cpu_kernel_forced"] = forced_kernel_name();
    d["cpu_kernel_error"] = py::none();
    for (const auto& [key, compute] : {std::pair{"match_cpu_kernel", Compute::kFloat32},
                                       std::pair{"cpu_kernel_bf16", Compute::kBFloat16}}) {
      try {
        d[key] = kernel_name(compute);
      } catch (const std::invalid_argument& e) {
        d[key] = py::none();
        d["cpu_kernel_error"] = e.what();
      }
    }
    const std::string& amx_missing = cpu_features().amx_missing;
    d["amx_unavailable"] = amx_missing.empty() ? py::object(py::none()) : py::object(py::str(amx_missing));
    return d;
  });

  m.def(
      "cpu_kernel", [](const std::string& compute) { return kernel_name(parse_compute(compute)); },
      py::arg("compute"),
      "The CPU kernel match and project run now for compute 'float32' or 'bfloat16' (None: no bf16 "
      "kernel here); follows CLEANDIFT_CPU_KERNEL, ValueError when that names one this CPU cannot run.");

  m.def(
      "tile_dpbf16ps_emulated",
      [](std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>> c,
         py::array_t<uint16_t, py::array::c_style | py::array::forcecast> a,
         py::array_t<uint16_t, py::array::c_style | py::array::forcecast> b) {
        // Shapes: c [M, N] fp32 (None: tilezero), a [M, 2K] and b [K, 2N] bf16 bits; M, K <= 16, N <= 16.
        if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) % 2 || b.shape(1) % 2)
          throw std::invalid_argument("tile_dpbf16ps_emulated: a [M, 2K] and b [K, 2N] bf16 bit arrays");
        const int64_t rows = a.shape(0), pairs = a.shape(1) / 2, cols = b.shape(1) / 2;
        if (rows < 1 || rows > 16 || pairs < 1 || pairs > 16 || cols < 1 || cols > 16 || b.shape(0) != pairs)
          throw std::invalid_argument("tile_dpbf16ps_emulated: need 1 <= M, K, N <= 16 and b with K rows");
        if (c && (c->ndim() != 2 || c->shape(0) != rows || c->shape(1) != cols))
          throw std::invalid_argument("tile_dpbf16ps_emulated: c must be [M, N]");
        py::array_t<float> out({rows, cols});
        TileConfig config = palette_config();
        config.rows[0] = config.rows[1] = static_cast<uint8_t>(rows);
        config.rows[2] = static_cast<uint8_t>(pairs);
        config.colsb[0] = config.colsb[2] = static_cast<uint16_t>(4 * cols);
        config.colsb[1] = static_cast<uint16_t>(4 * pairs);
        EmulatedTiles::configure(config);
        if (c)
          EmulatedTiles::load<0>(c->data(), 4 * cols);
        else
          EmulatedTiles::zero<0>();
        EmulatedTiles::load<1>(a.data(), 4 * pairs);
        EmulatedTiles::load<2>(b.data(), 4 * cols);
        EmulatedTiles::dpbf16ps<0, 1, 2>();
        EmulatedTiles::store<0>(out.mutable_data(), 4 * cols);
        EmulatedTiles::release();
        return out;
      },
      py::arg("c"), py::arg("a"), py::arg("b"),
      "One emulated tdpbf16ps on tiles shaped by the arrays (tests of the tile emulation): returns "
      "c + a . b with the instruction's rounding, c [M, N] float32 or None (tilezero), a [M, 2K] and "
      "b [K, 2N] bf16 bits (VNNI: b's row k holds channel pair k of every column).");

  m.def(
      "match_cpu",
      [](const py::array& src, const py::array& dst, const std::string& dtype, bool mutual, int k, bool check_finite,
         const std::string& compute) {
        const DType dt = parse_dtype(dtype, src);
        const Compute cp = parse_compute(compute);
        parse_dtype(dtype, dst);
        const FeatureView s = feature_view(src, "src"), t = feature_view(dst, "dst");
        const MatchOptions opt{mutual, k, check_finite};
        // Sized from k before match_cpu checks it: cleandift_rt.match has checked 1 <= k <= M.
        py::array_t<int64_t> index({s.batch, s.rows, static_cast<int64_t>(k)});
        py::array_t<float> similarity({s.batch, s.rows, static_cast<int64_t>(k)});
        const MatchOutput out{index.mutable_data(), similarity.mutable_data()};
        {
          py::gil_scoped_release release;
          match_cpu(s, t, dt, opt, out, cp);
        }
        return py::make_tuple(index, similarity);
      },
      py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("mutual"), py::arg("k"), py::arg("check_finite"),
      py::arg("compute") = "float32",
      "Fused cosine-similarity matching of [B, N, C] against [B, M, C] (any strides); returns int64 and "
      "float32 arrays [B, N, k]. compute 'bfloat16': bf16 products (AMX / AVX512_BF16). Use cleandift_rt.match, "
      "which adds the layouts, torch and checks.");

  m.def(
      "match_cuda",
      [](uintptr_t src, int64_t src_batch, int64_t n, int64_t src_channels, uintptr_t dst, int64_t dst_batch,
         int64_t m_rows, int64_t dst_channels, const std::string& dtype, bool mutual, int k, uintptr_t index,
         uintptr_t similarity, uintptr_t stream) {
        const DType dt = parse_dtype(dtype);
        // Each buffer comes with its own shape so the op's argument check sees real mismatches.
        const FeatureView s = device_view(src, src_batch, n, src_channels),
                          t = device_view(dst, dst_batch, m_rows, dst_channels);
        const MatchOptions opt{mutual, k, false};
        const MatchOutput out{reinterpret_cast<int64_t*>(index), reinterpret_cast<float*>(similarity)};
        py::gil_scoped_release release;
        match_cuda(s, t, dt, opt, out, reinterpret_cast<void*>(stream));
      },
      py::arg("src"), py::arg("src_batch"), py::arg("n"), py::arg("src_channels"), py::arg("dst"),
      py::arg("dst_batch"), py::arg("m"), py::arg("dst_channels"), py::arg("dtype"), py::arg("mutual"), py::arg("k"),
      py::arg("index"), py::arg("similarity"), py::arg("stream"),
      "CUDA matching on contiguous device buffers (pointers) [B, N, C] and [B, M, C]; outputs [B, N, k] "
      "preallocated on the device. "
      "Finiteness is checked by the caller (cleandift_rt.match).");

  py::class_<PackedHead, std::shared_ptr<PackedHead>>(
      m, "PackedHead", "Projection-head weights packed once for the CPU micro-kernel (see pack_head).")
      .def_readonly("dim", &PackedHead::dim)
      .def_property_readonly("kernel", [](const PackedHead& h) { return cpu_isa_name(h.isa); })
      .def("__repr__", [](const PackedHead& h) {
        return "<PackedHead D=" + std::to_string(h.dim) + " kernel=" + cpu_isa_name(h.isa) + ">";
      });

  m.def(
      "pack_head",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> up,
         py::array_t<float, py::array::c_style | py::array::forcecast> down, const std::string& compute) {
        const Compute cp = parse_compute(compute);
        if (down.ndim() != 3 || down.shape(0) != kHeadLayers || down.shape(1) != down.shape(2))
          throw std::invalid_argument("pack_head: down must be [3, D, D]");
        const int64_t dim = down.shape(1);
        if (up.ndim() != 3 || up.shape(0) != kHeadLayers || up.shape(1) != 2 * dim || up.shape(2) != dim)
          throw std::invalid_argument("pack_head: up must be [3, 2D, D] with D = " + std::to_string(dim));
        py::gil_scoped_release release;
        return pack_head(up.data(), down.data(), dim, cp);
      },
      py::arg("up"), py::arg("down"), py::arg("compute") = "float32",
      "Pack the up [3, 2D, D] and down [3, D, D] weights of one head (float32) for project_cpu; compute "
      "'bfloat16' rounds them to bf16 for the bf16 kernel (AMX / AVX512_BF16).");

  m.def(
      "project_cpu",
      [](const PackedHead& head, const py::array& x, py::array& out, const std::string& dtype,
         py::array_t<float, py::array::c_style | py::array::forcecast> scales, const std::string& conditioning,
         std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>> shifts) {
        const DType dt = parse_dtype(dtype, x);
        parse_dtype(dtype, out);
        const FeatureView xv = feature_view(x, "features"), ov = feature_view(out, "out");
        auto modulation_shape = [&](const py::array& a, const char* what) {
          if (a.ndim() != 3 || a.shape(0) != kHeadLayers || a.shape(1) != xv.batch || a.shape(2) != head.dim)
            throw std::invalid_argument(std::string("project: ") + what + " must be [3, B, D]");
        };
        modulation_shape(scales, "scales");
        if (shifts) modulation_shape(*shifts, "shifts");
        const HeadModulation mod{parse_conditioning(conditioning), scales.data(), shifts ? shifts->data() : nullptr};
        void* out_data = out.mutable_data();
        py::gil_scoped_release release;
        project_head_cpu(head, xv, dt, mod, ov, out_data);
      },
      py::arg("head"), py::arg("features"), py::arg("out"), py::arg("dtype"), py::arg("scales"),
      py::arg("conditioning") = "adarms", py::arg("shifts") = py::none(),
      "Fused head on strided [B, P, D] features into `out` (same shape, any strides); scales [3, B, D] = "
      "1 + scale(cond), and for conditioning 'film' shifts [3, B, D]. Use cleandift_rt.project.");

  m.def(
      "project_cuda",
      [](uintptr_t x, uintptr_t out, int64_t batch, int64_t pixels, int64_t dim, const std::string& dtype,
         uintptr_t up, uintptr_t down, uintptr_t scales, uintptr_t stream, const std::string& conditioning,
         uintptr_t shifts) {
        const DType dt = parse_dtype(dtype);
        const HeadModulation mod{parse_conditioning(conditioning), reinterpret_cast<const float*>(scales),
                                 reinterpret_cast<const float*>(shifts)};
        py::gil_scoped_release release;
        project_head_cuda(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(out), batch, pixels, dim, dt,
                          reinterpret_cast<const float*>(up), reinterpret_cast<const float*>(down), mod,
                          reinterpret_cast<void*>(stream));
      },
      py::arg("features"), py::arg("out"), py::arg("batch"), py::arg("pixels"), py::arg("dim"), py::arg("dtype"),
      py::arg("up"), py::arg("down"), py::arg("scales"), py::arg("stream"), py::arg("conditioning") = "adarms",
      py::arg("shifts") = 0,
      "Fused head on contiguous [B, P, D] device buffers; float32 device weights, scales and (FiLM) shifts.");
}
