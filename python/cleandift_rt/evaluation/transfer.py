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

DEFAULT_BAND_BYTES = 32 << 20  # a band stays in the last-level cache between upsampling and matching


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


def upsample_columns(features: torch.Tensor, out_w: int) -> torch.Tensor:
    """The horizontal half of bilinear upsampling, channels last: ``[C, h, w]`` -> ``[h, out_w, C]``."""
    _, _, w = features.shape
    x0, x1, lx = source_index(out_w, w, torch.arange(out_w))
    rows = features.permute(1, 2, 0).contiguous()  # [h, w, C]: the gathers below copy whole C-vectors
    out = rows.index_select(1, x0).mul_((1 - lx)[None, :, None])
    return out.add_(rows.index_select(1, x1).mul_(lx[None, :, None]))


def upsample_rows(columns: torch.Tensor, out_h: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of the full bilinear upsampling, from :func:`upsample_columns`: ``[len(rows), W, C]``.

    Together the two halves compute ``F.interpolate(x, (out_h, out_w), mode="bilinear")`` with the
    same weights in the same order (x, then y), channels last so that the matcher reads contiguous
    vectors; in-place arithmetic keeps the memory traffic to a few passes over the band.
    """
    y0, y1, ly = source_index(out_h, columns.shape[0], rows)
    out = columns.index_select(0, y0).mul_((1 - ly)[:, None, None])
    return out.add_(columns.index_select(0, y1).mul_(ly[:, None, None]))


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
    columns = upsample_columns(trg, tw)  # [h, W, C]
    band = max(1, int(band_bytes // (channels * tw * 4)))
    for r0 in range(0, th, band):
        rows = torch.arange(r0, min(th, r0 + band))
        target = upsample_rows(columns, th, rows).reshape(1, -1, channels)  # [1, R * W, C], row-major pixels
        idx, sim = matcher(queries, target)
        idx = torch.as_tensor(np.asarray(idx)).reshape(-1).long()
        sim = torch.as_tensor(np.asarray(sim)).reshape(-1).float()
        better = sim > best_sim  # strict: on a tie the earlier band (lower index) keeps the match
        best_sim = torch.where(better, sim, best_sim)
        best_idx = torch.where(better, idx + r0 * tw, best_idx)
    pred = torch.stack([best_idx % tw, best_idx // tw], 1).double().numpy()
    return pred, best_sim.numpy()
