"""Keypoint transfer as the SPair protocol defines it (SPEC section 6).

Both feature maps are upsampled bilinearly (``align_corners=False``) to their original image
sizes; each source keypoint takes the feature at its (rounded) pixel, and its match is the target
pixel of highest cosine similarity. The upsampled target map of a 500 x 375 image at 1280 channels
is ~1 GB, so it is built a band of rows at a time (the same arithmetic as ``F.interpolate``) and
every band is searched with the native matcher ``cleandift_rt.match``; the best over bands wins,
ties going to the lower index like the matcher's own.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BAND_BYTES = 256 << 20


def default_matcher():
    """``cleandift_rt.match``: imported on first use so that loading data never needs the native module."""
    from ..matching import match

    return match


def source_index(out_size: int, in_size: int, idx: torch.Tensor):
    """Bilinear source rows/columns and weights for output indices (PyTorch's align_corners=False rule)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((idx.to(torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, src - i0.to(torch.float32)


def upsample_rows(features: torch.Tensor, out_hw: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``F.interpolate(features[None], out_hw, mode="bilinear")[0]``: ``[C, len(rows), W]``."""
    out_h, out_w = out_hw
    _, h, w = features.shape
    y0, y1, ly = source_index(out_h, h, rows)
    x0, x1, lx = source_index(out_w, w, torch.arange(out_w))
    band = features[:, y0, :] * (1 - ly)[None, :, None] + features[:, y1, :] * ly[None, :, None]
    return band[:, :, x0] * (1 - lx) + band[:, :, x1] * lx


def sample_points(features: torch.Tensor, out_hw: tuple[int, int], points: np.ndarray) -> torch.Tensor:
    """Features of the upsampled map at the rounded keypoints ``[N, 2]`` (x, y): ``[N, C]``."""
    out_h, out_w = out_hw
    _, h, w = features.shape
    pts = torch.as_tensor(np.floor(np.asarray(points, dtype=np.float64) + 0.5), dtype=torch.long)
    xs, ys = pts[:, 0].clamp(0, out_w - 1), pts[:, 1].clamp(0, out_h - 1)
    y0, y1, ly = source_index(out_h, h, ys)
    x0, x1, lx = source_index(out_w, w, xs)
    top = features[:, y0, x0] * (1 - lx) + features[:, y0, x1] * lx
    bottom = features[:, y1, x0] * (1 - lx) + features[:, y1, x1] * lx
    return (top * (1 - ly) + bottom * ly).T.contiguous()


def transfer_points(source_features, target_features, source_size: tuple[int, int], target_size: tuple[int, int],
                    points: np.ndarray, matcher=None, band_bytes: int = DEFAULT_BAND_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Transfer ``points`` ([N, 2] x, y in the source image) to the target image.

    ``source_features`` / ``target_features``: ``[C, h, w]`` maps; ``*_size``: original ``(W, H)``.
    Returns predicted target pixels ``[N, 2]`` (x, y, integers as float64) and cosine similarities ``[N]``.
    """
    src = torch.as_tensor(source_features).float()
    trg = torch.as_tensor(target_features).float()
    if src.ndim != 3 or trg.ndim != 3 or src.shape[0] != trg.shape[0]:
        raise ValueError(f"feature maps must be [C, h, w] with the same C, got {tuple(src.shape)} and {tuple(trg.shape)}")
    matcher = matcher or default_matcher()
    (sw, sh), (tw, th) = source_size, target_size
    queries = sample_points(src, (sh, sw), points)[None]  # [1, N, C]
    n, channels = queries.shape[1], trg.shape[0]
    best_sim = torch.full((n,), -float("inf"))
    best_idx = torch.zeros(n, dtype=torch.long)
    band = max(1, int(band_bytes // (channels * tw * 4)))
    for r0 in range(0, th, band):
        rows = torch.arange(r0, min(th, r0 + band))
        target = upsample_rows(trg, (th, tw), rows)[None]  # [1, C, R, W]
        idx, sim = matcher(queries, target)
        idx = torch.as_tensor(np.asarray(idx)).reshape(-1).long()
        sim = torch.as_tensor(np.asarray(sim)).reshape(-1).float()
        better = sim > best_sim  # strict: on a tie the earlier band (lower index) keeps the match
        best_sim = torch.where(better, sim, best_sim)
        best_idx = torch.where(better, idx + r0 * tw, best_idx)
    pred = torch.stack([best_idx % tw, best_idx // tw], 1).double().numpy()
    return pred, best_sim.numpy()
