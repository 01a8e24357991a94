"""Fused cosine-similarity matching: ``match(src, dst)`` -> nearest target vector per source vector.

The native kernel (``csrc/ops/match*``) computes cosine similarities tile by tile and reduces each
tile while it is hot (row argmax / top-k, and the column argmax for mutual nearest neighbours), so
the N x M similarity matrix never exists: memory is O(B (N + M)) besides the inputs.

Semantics (the same on every backend):

* every vector is divided by ``max(||x||, 1e-12)`` (``torch.nn.functional.normalize``), so a zero
  vector has similarity 0 with every target; a zero *source* vector therefore matches target 0;
* ties: the lowest target index wins (for mutual NN, also the lowest source index);
* NaN / Inf in the inputs raise ``ValueError`` naming the first bad element; with
  ``allow_nonfinite=True`` they are matched anyway, NaN similarities never win, and a source vector
  with no comparable similarity gets index -1 and similarity NaN;
* ``mutual=True``: index -1 where the target's best source is another vector; the similarity stays
  the forward best similarity (so it can still be thresholded).

Precision (CPU): ``precision="fp32"`` multiplies in fp32; ``"bf16"`` normalises in fp32, rounds the
normalised vectors to bf16 and sums their products in fp32 (AMX-BF16 ``tdpbf16ps`` tiles, else
AVX512_BF16 ``vdpbf16ps``; ``build_info()["cpu_kernel_bf16"]`` names it): about 2x faster on Zen 4,
similarities within 2^-7 of the exact cosine at worst and about 1e-4 typically (ties are still
exact: equal vectors give bit-identical similarities). The default follows the inputs: bf16 inputs
use bf16 where the CPU has it, everything else fp32. Where the CPU lacks native bf16, ``"bf16"``
warns once and runs fp32. On CUDA, ``precision`` converts the inputs (``"bf16"``: to bf16, tensor
cores; ``"fp32"``: to fp32, exact FMA tiles).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..build_info import native
from ..checks import check_size
from .precision import NATIVE_COMPUTE, check_precision, kernel_precision
from .refine import DEFAULT_TEMPERATURE, DEFAULT_WINDOW, check_refine, soft_argmax

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
COORDS = ("index", "feature", "image")


def _to_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float16):
            raise TypeError(f"{name} has numpy dtype {x.dtype}; match takes float32 or float16 "
                            "(convert with .astype(np.float32))")
        if any(s < 0 for s in x.strides):
            x = x.copy()
        # match only reads its inputs: read-only arrays (memory maps) go in place through DLPack,
        # which, unlike from_numpy, does not warn about them.
        return (torch.from_numpy(x) if x.flags.writeable else torch.from_dlpack(x)), True
    if isinstance(x, torch.Tensor):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; match takes float32, float16 or bfloat16 "
                            "(convert with .float())")
        return x.detach(), False
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """[B, N, C] as is; [B, C, h, w] as the (strided, uncopied) view [B, h*w, C] plus (h, w)."""
    if x.ndim == 3:
        return x, None
    if x.ndim == 4:
        b, c, h, w = x.shape
        return x.flatten(2).transpose(1, 2), (h, w)
    raise ValueError(f"{name} must be [B, N, C] or [B, C, h, w], got shape {tuple(x.shape)}")


def _native_array(x: torch.Tensor) -> np.ndarray:
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


_CUDA_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _match_rows(src: torch.Tensor, dst: torch.Tensor, mutual: bool, k: int, allow_nonfinite: bool,
                precision: str | None):
    """The kernel on [B, N, C] / [B, M, C] tensors of one device and dtype -> [B, N, k] tensors."""
    if src.device.type == "cpu":
        compute = NATIVE_COMPUTE[kernel_precision(src.dtype, precision, stacklevel=5)]
        index, sim = native().match_cpu(_native_array(src), _native_array(dst), _DTYPES[src.dtype], mutual, k,
                                        not allow_nonfinite, compute)
        return torch.from_numpy(index), torch.from_numpy(sim)
    if src.device.type != "cuda":
        raise ValueError(f"match runs on CPU or CUDA tensors, got device {src.device}")
    if not native().build_info()["cuda_compiled"]:
        raise RuntimeError("match got CUDA tensors but this build of cleandift_rt has no CUDA kernels")
    if precision is not None:  # the CUDA kernel's precision follows its input dtype
        src, dst = src.to(_CUDA_DTYPES[precision]), dst.to(_CUDA_DTYPES[precision])
    dtype = _DTYPES[src.dtype]
    if not allow_nonfinite:
        for name, x in (("src", src), ("dst", dst)):
            if not torch.isfinite(x).all():
                raise ValueError(f"{name} contains NaN or Inf; clean the features or pass allow_nonfinite=True")
    src, dst = src.contiguous(), dst.contiguous()
    b, n, c = src.shape
    index = torch.empty(b, n, k, dtype=torch.int64, device=src.device)
    sim = torch.empty(b, n, k, dtype=torch.float32, device=src.device)
    with torch.cuda.device(src.device):
        stream = torch.cuda.current_stream().cuda_stream
        native().match_cuda(src.data_ptr(), *src.shape, dst.data_ptr(), *dst.shape, dtype, mutual, k,
                            index.data_ptr(), sim.data_ptr(), stream)
    return index, sim


def sample_points(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``features [B, C, h, w]`` at ``points [B, P, 2]`` (x, y in feature pixels,
    pixel centres at integers; clamped to the border) -> ``[B, P, C]``."""
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[0] != features.shape[0]:
        raise ValueError(f"points must be [B, P, 2] (x, y) with B = {features.shape[0]}, "
                         f"got shape {tuple(points.shape)}")
    h, w = features.shape[-2:]
    scale = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=torch.float32, device=points.device)
    grid = (points.float().to(features.device) / scale.to(features.device) * 2 - 1)
    sampled = F.grid_sample(features.float(), grid[:, :, None, :], mode="bilinear", padding_mode="border",
                            align_corners=True)
    return sampled[..., 0].transpose(1, 2).to(features.dtype)


def _image_sizes(image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(source image size, target image size) from ``(H, W)`` (both) or ``((H, W), (H', W'))``."""
    message = ("coords='image' needs image_size=(H, W) of the images the features came from, or "
               "((H, W), (H', W')) when source and target images differ in size")
    if image_size is None or len(image_size) != 2:
        raise ValueError(message)
    pair = tuple(image_size)
    sizes = pair if all(isinstance(s, Sequence) for s in pair) else (pair, pair)
    if any(not isinstance(s, Sequence) or len(s) != 2 for s in sizes):
        raise ValueError(f"{message}; got {image_size!r}")
    try:
        return tuple(tuple(check_size(v, "each side") for v in s) for s in sizes)
    except (TypeError, ValueError) as exc:  # a bool, a fraction, a side <= 0
        raise ValueError(f"{message}; got {image_size!r} ({exc})") from None


def _scale_xy(image_size: tuple[int, int], feature_size: tuple[int, int]) -> tuple[float, float]:
    """(sx, sy): image pixel = (feature pixel + 0.5) * s - 0.5 (pixel centres align)."""
    return image_size[1] / feature_size[1], image_size[0] / feature_size[0]


def match(src, dst, *, mutual: bool = False, k: int = 1, points=None, coords: str = "index",
          image_size: Sequence | None = None, refine: bool = False, window: int = DEFAULT_WINDOW,
          temperature: float = DEFAULT_TEMPERATURE, allow_nonfinite: bool = False, precision: str | None = None):
    """Nearest target vector (cosine similarity) of every source vector, without an N x M matrix.

    Args:
        src: ``[B, N, C]`` or ``[B, C, h, w]`` (rows of the [B, C, h, w] form are y * w + x),
            torch (CPU, or CUDA when built with CUDA) or numpy; float32, float16 or bfloat16.
        dst: ``[B, M, C]`` or ``[B, C, h', w']``, same kind, dtype and device as ``src``.
        mutual: keep only mutual nearest neighbours (index -1 elsewhere); both directions come
            from the same pass over the similarity tiles. k = 1 only.
        k: top-k per source vector, best first (ties: lower index first).
        points: optional ``[B, P, 2]`` source positions (x, y) sampled bilinearly from a
            ``[B, C, h, w]`` src (feature pixels; image pixels when ``coords="image"``).
        coords: ``"index"`` (default) returns target indices; ``"feature"`` returns target
            positions (x, y) in target feature pixels, ``"image"`` in pixels of ``image_size``
            (needs a ``[B, C, h', w']`` dst). Positions of absent mutual matches are NaN.
        image_size: ``(H, W)`` of the images both maps came from, or ``((H, W), (H', W'))`` for
            source and target images of different sizes (``points`` use the source size).
        refine: window soft-argmax around the argmax (``window`` x ``window``, ``temperature``);
            needs coords ``"feature"`` or ``"image"`` and k = 1.
        allow_nonfinite: match NaN / Inf inputs instead of raising (see module docstring).
        precision: ``"fp32"``, ``"bf16"`` or None (bf16 for bf16 inputs where the CPU has native bf16,
            else fp32); see the module docstring.

    Returns:
        ``(index, similarity)``: index int64 ``[B, N]`` (``[B, N, k]`` for k > 1), or float32
        positions ``[B, N, 2]`` / ``[B, N, k, 2]`` when ``coords`` is not ``"index"``; similarity
        float32 ``[B, N]`` / ``[B, N, k]``. numpy in -> numpy out, torch in -> torch out (same device).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    check_precision(precision)
    k = int(k)
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
    if refine and (coords == "index" or k != 1):
        raise ValueError("refine=True needs coords='feature' or 'image' and k = 1")
    if refine:
        window, temperature = check_refine(window, temperature)
    src_t, numpy_out = _to_tensor(src, "src")
    dst_t, _ = _to_tensor(dst, "dst")
    if src_t.device != dst_t.device:
        raise ValueError(f"src is on {src_t.device} but dst is on {dst_t.device}; move both to one device")
    if src_t.dtype != dst_t.dtype:
        raise TypeError(f"src is {src_t.dtype} but dst is {dst_t.dtype}; convert one so both match")
    src_rows, src_hw = _as_rows(src_t, "src")
    dst_rows, dst_hw = _as_rows(dst_t, "dst")
    if coords != "index" and dst_hw is None:
        raise ValueError(f"coords={coords!r} needs dst as [B, C, h, w] to know the target grid")
    if coords == "image":
        src_image_size, dst_image_size = _image_sizes(image_size)
    if src_rows.shape[0] == 0:
        raise ValueError("match: empty batch (B = 0); pass at least one feature map")
    # The kernels check shapes and k themselves; a k beyond int32 would not even reach that check.
    if k > dst_rows.shape[1] > 0:
        raise ValueError(f"match: k = {k} exceeds the {dst_rows.shape[1]} target vectors")

    if points is not None:
        if src_hw is None:
            raise ValueError("points need src as [B, C, h, w] to sample from")
        pts = torch.as_tensor(points, dtype=torch.float32)
        if coords == "image":
            sx, sy = _scale_xy(src_image_size, src_hw)
            pts = torch.stack([(pts[..., 0] + 0.5) / sx - 0.5, (pts[..., 1] + 0.5) / sy - 0.5], dim=-1)
        if not allow_nonfinite and not torch.isfinite(pts).all():
            raise ValueError("points contain NaN or Inf")
        src_rows = sample_points(src_t, pts)

    index, sim = _match_rows(src_rows, dst_rows, mutual, k, allow_nonfinite, precision)
    if k == 1:
        index, sim = index[..., 0], sim[..., 0]

    result = index
    if coords != "index":
        h, w = dst_hw
        if refine:
            safe = index.clamp(min=0)
            result = soft_argmax(src_rows, dst_t, safe, window, temperature)
        else:
            result = torch.stack([(index % w).float(), (index // w).float()], dim=-1)
        result = result.masked_fill((index < 0)[..., None], float("nan"))
        if coords == "image":
            sx, sy = _scale_xy(dst_image_size, dst_hw)
            scale = torch.tensor([sx, sy], device=result.device)
            result = (result + 0.5) * scale - 0.5
    if numpy_out:
        return result.cpu().numpy(), sim.cpu().numpy()
    return result, sim
