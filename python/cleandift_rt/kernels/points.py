"""``match_points``: "the match for these pixels", the point query users of dense descriptors ask for.

The source map is sampled bilinearly at the given points (one ``C``-vector per point) and those
vectors are matched against the whole target map by the native ``match`` kernel (cosine argmax,
tile by tile, no N x M matrix), then refined by the window soft-argmax (``kernels.refine``).
Coordinates are image pixels with pixel centres at integers, as everywhere in the package.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .matching import match
from .refine import DEFAULT_TEMPERATURE, DEFAULT_WINDOW


def _as_batched_map(feats, name: str):
    """``[C, h, w]`` -> ``[1, C, h, w]`` (and whether it was unbatched); ``[B, C, h, w]`` as is."""
    ndim = feats.ndim
    if ndim == 3:
        return feats[None], True
    if ndim == 4:
        return feats, False
    raise ValueError(f"{name} must be a feature map [C, h, w] or [B, C, h, w], got shape {tuple(feats.shape)}")


def match_points(src_feats, points, dst_feats, *, refine: bool = True, image_size: Sequence | None = None,
                 window: int = DEFAULT_WINDOW, temperature: float = DEFAULT_TEMPERATURE, precision: str | None = None):
    """Where the ``points`` of the source image went in the target image, and how sure the match is.

    Args:
        src_feats: source feature map ``[C, h, w]`` (or a batch ``[B, C, h, w]``), torch or numpy.
        points: ``[N, 2]`` (x, y) positions in the source image (``[B, N, 2]`` for a batch; ``[N, 2]``
            is used for every map of a batch).
        dst_feats: target feature map ``[C, h', w']`` / ``[B, C, h', w']``, same kind and dtype.
        refine: window soft-argmax around the best cell (sub-cell positions); False returns cell centres.
        image_size: ``(H, W)`` of the images both maps came from, or ``((H, W), (H', W'))`` when the
            source and target images differ. None: ``points`` and the result are in feature pixels.
        window, temperature: the soft-argmax window (odd) and softmax temperature.
        precision: the match kernel's precision (``"fp32"``, ``"bf16"``, None: follow the inputs).

    Returns:
        ``(points, score)``: ``[N, 2]`` float32 (x, y) in the target image (``[B, N, 2]`` for a batch)
        and ``[N]`` float32 cosine similarities of the matches. numpy in -> numpy out, torch in -> torch out.
    """
    src, unbatched = _as_batched_map(src_feats, "src_feats")
    dst, dst_unbatched = _as_batched_map(dst_feats, "dst_feats")
    if unbatched != dst_unbatched:
        raise ValueError(f"src_feats and dst_feats must both be single maps [C, h, w] or both batches "
                         f"[B, C, h, w], got shapes {tuple(src_feats.shape)} and {tuple(dst_feats.shape)}")
    pts = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points,
                          dtype=torch.float32).cpu()
    batch = src.shape[0]
    if pts.ndim == 2 and pts.shape[-1] == 2:
        pts = pts[None].expand(batch, -1, -1)
    if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[0] != batch:
        raise ValueError(f"points must be [N, 2] (x, y) pixels" + ("" if unbatched else f" or [{batch}, N, 2]")
                         + f", got shape {tuple(pts.shape)}")
    if pts.shape[1] == 0:
        raise ValueError("points is empty: pass at least one (x, y) point")
    if not torch.isfinite(pts).all():
        raise ValueError("points contain NaN or Inf")
    coords = "feature" if image_size is None else "image"
    found, score = match(src, dst, points=pts, coords=coords, image_size=image_size, refine=refine, window=window,
                         temperature=temperature, precision=precision)
    return (found[0], score[0]) if unbatched else (found, score)


__all__ = ["match_points"]
