"""Keypoint transfer as the SPair protocol defines it (docs/method.md, evaluation protocol).

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
    from ..kernels.matching import match

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


def _cosine_analytic(queries: torch.Tensor, features: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity ``[N, H * W]`` of each query with every pixel of the bilinearly upsampled map,
    without building that map.

    A bilinear vector is ``v = sum_k w_k f_k`` over the four corners of its cell, so ``q . v`` is the
    bilinear upsampling of the low-resolution map ``q . F``, and ``|v|^2 = sum_kl w_k w_l <f_k, f_l>``
    needs only the inner products of each low-resolution vector with its right, lower and two diagonal
    neighbours. Computed in float64: the same value as materialising the map, to rounding.
    """
    out_h, out_w = out_hw
    f = features.double()
    _, h, w = f.shape
    down, right = torch.arange(h).add(1).clamp(max=h - 1), torch.arange(w).add(1).clamp(max=w - 1)
    f01, f10 = f[:, :, right], f[:, down, :]
    f11 = f10[:, :, right]
    norm = (f * f).sum(0)  # [h, w]; the neighbours' own norms are shifted copies of it
    g_01, g_10, g_11, g_0110 = (f * f01).sum(0), (f * f10).sum(0), (f * f11).sum(0), (f01 * f10).sum(0)
    dots = torch.einsum("nc,chw->nhw", queries.double(), f)

    y0, y1, ly = source_index(out_h, h, torch.arange(out_h))
    x0, x1, lx = source_index(out_w, w, torch.arange(out_w))
    ly, lx = ly.double()[:, None], lx.double()[None, :]
    w00, w01, w10, w11 = (1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx  # [H, W]

    def at(grid, rows, cols):  # grid[..., rows[:, None], cols[None, :]] -> [..., H, W]
        return grid[..., rows[:, None], cols[None, :]]

    n00, n01, n10, n11 = at(norm, y0, x0), at(norm, y0, x1), at(norm, y1, x0), at(norm, y1, x1)
    norm2 = (w00 * w00 * n00 + w01 * w01 * n01 + w10 * w10 * n10 + w11 * w11 * n11
             + 2 * (w00 * w01 * at(g_01, y0, x0) + w00 * w10 * at(g_10, y0, x0) + w00 * w11 * at(g_11, y0, x0)
                    + w01 * w10 * at(g_0110, y0, x0) + w01 * w11 * at(g_10, y0, x1) + w10 * w11 * at(g_01, y1, x0)))
    dot = w00 * at(dots, y0, x0) + w01 * at(dots, y0, x1) + w10 * at(dots, y1, x0) + w11 * at(dots, y1, x1)
    eps = 1e-12  # F.normalize's floor on the norm
    qn = queries.double().norm(dim=1).clamp(min=eps)[:, None, None]
    return (dot / (qn * norm2.clamp(min=0).sqrt().clamp(min=eps))).reshape(len(queries), -1)


TRANSFER_METHODS = ("matcher", "analytic")


def transfer_points(source_features, target_features, source_size: tuple[int, int], target_size: tuple[int, int],
                    points: np.ndarray, matcher=None, band_bytes: int = DEFAULT_BAND_BYTES,
                    method: str = "matcher") -> tuple[np.ndarray, np.ndarray]:
    """Transfer ``points`` ([N, 2] x, y in the source image) to the target image.

    ``source_features`` / ``target_features``: ``[C, h, w]`` maps; ``*_size``: original ``(W, H)``.
    ``method``: ``"matcher"`` builds the upsampled target band by band and searches it with
    ``cleandift_rt.match``; ``"analytic"`` computes the same cosines in closed form (float64,
    :func:`_cosine_analytic`), orders of magnitude faster on a CPU. Both take the lowest index on ties.
    Returns predicted target pixels ``[N, 2]`` (x, y, integers as float64) and cosine similarities ``[N]``.
    """
    if method not in TRANSFER_METHODS:
        raise ValueError(f"unknown transfer method {method!r}: use one of {', '.join(TRANSFER_METHODS)}")
    src = torch.as_tensor(source_features).float()
    trg = torch.as_tensor(target_features).float()
    if src.ndim != 3 or trg.ndim != 3 or src.shape[0] != trg.shape[0]:
        raise ValueError(f"feature maps must be [C, h, w] with the same C, got {tuple(src.shape)} and {tuple(trg.shape)}")
    (sw, sh), (tw, th) = source_size, target_size
    queries = sample_points(src, (sh, sw), points)  # [N, C]
    if method == "analytic":
        best_sim, best_idx = _cosine_analytic(queries, trg, (th, tw)).max(dim=1)
        best_sim = best_sim.float()
    else:
        best_sim, best_idx = _match_banded(queries, trg, (th, tw), matcher or default_matcher(), band_bytes)
    pred = torch.stack([best_idx % tw, best_idx // tw], 1).double().numpy()
    return pred, best_sim.numpy()


def _match_banded(queries: torch.Tensor, trg: torch.Tensor, out_hw: tuple[int, int], matcher, band_bytes: int):
    th, tw = out_hw
    n, channels = queries.shape[0], trg.shape[0]
    best_sim = torch.full((n,), -float("inf"))
    best_idx = torch.zeros(n, dtype=torch.long)
    columns = upsample_columns(trg, tw)  # [h, W, C]
    band = max(1, int(band_bytes // (channels * tw * 4)))
    for r0 in range(0, th, band):
        rows = torch.arange(r0, min(th, r0 + band))
        target = upsample_rows(columns, th, rows).reshape(1, -1, channels)  # [1, R * W, C], row-major pixels
        idx, sim = matcher(queries[None], target)
        idx = torch.as_tensor(np.asarray(idx)).reshape(-1).long()
        sim = torch.as_tensor(np.asarray(sim)).reshape(-1).float()
        better = sim > best_sim  # strict: on a tie the earlier band (lower index) keeps the match
        best_sim = torch.where(better, sim, best_sim)
        best_idx = torch.where(better, idx + r0 * tw, best_idx)
    return best_sim, best_idx


def dense_matches(fa, fb, size_a, size_b, mutual: bool = True):
    """Nearest neighbours between all feature cells of two ``[C, h, w]`` maps.

    Returns points in image A, points in image B (cell centres in original pixels) and cosine
    similarities, for mutual nearest neighbours only when ``mutual``.
    """

    idx, sim = default_matcher()(fa[None].contiguous(), fb[None].contiguous(), mutual=mutual)
    idx, sim = np.asarray(idx)[0], np.asarray(sim)[0]
    (ha, wa), (hb, wb) = fa.shape[1:], fb.shape[1:]
    keep = np.nonzero(idx >= 0)[0]
    src = np.stack([keep % wa, keep // wa], 1)
    dst = np.stack([idx[keep] % wb, idx[keep] // wb], 1)
    pa = (src + 0.5) * np.array([size_a[0] / wa, size_a[1] / ha]) - 0.5
    pb = (dst + 0.5) * np.array([size_b[0] / wb, size_b[1] / hb]) - 0.5
    return pa, pb, sim[keep]
