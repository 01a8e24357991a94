"""Adaptive pose alignment ("Telling Left from Right", docs/method.md, zero-shot fusion): match the horizontally flipped
source too, and keep its predictions when its features fit the target better.

SPair-71k's keypoints carry ids (``kps_ids`` in every pair annotation, ``0 .. count - 1`` per
category, the keys of ``ImageAnnotation/*.json``'s ``kps``). Mirroring an image turns a left part
into a right one, so the flipped source's point for id ``i`` is the mirror of the source point of
``i``'s left/right partner. The partner table below is SPair-71k's own keypoint definition of
left and right parts (as GeoAware-SC tabulates it; our table is in SPair's id space, not in a
compacted per-split index); ``SIDES`` holds each id's side (L, R or N = on the symmetry plane) so
the tests can check the two agree.

The fit is the mean, over the source object's cells, of the distance of each cell's (unit) descriptor
to its nearest target object cell; the objects are the SPair bounding boxes when the annotation has
them (the reference uses SAM masks), otherwise a foreground from the first principal component of
the pair's descriptors (``viz.pictures.pca_maps``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels.matching import match

# category -> side of each keypoint id (index = id): L left, R right, N neither
SIDES = {
    "aeroplane": "NNNNRLRLRLRLRLRLRLRLRLNNN", "bicycle": "NNRLNNRLNRLNNN", "bird": "NRLNRLNRLNRLRLRLN",
    "boat": "NRLRLRLRLRLRLN", "bottle": "LRLRLRLRLR", "bus": "RLRLNRLNNNRRRRRRRLRLLLLLLLRLRL",
    "car": "RLRLNNRLNNRRRRRRRLRLLLLLLLRLRL", "cat": "RLRLRLRLNRLRLNN", "chair": "RLRLRLRLRLRLRL",
    "cow": "RLRLRLRLNRLRLNNRLRLRL", "dog": "RLRLRLNNNRLRLNNN", "horse": "RLRLRLRLNNRLRLNNRLRL",
    "motorbike": "RLRLNNNNNNNNN", "person": "RLRLNNNNRLRLRLRLRLRL", "pottedplant": "RNLNRLRNL",
    "sheep": "RLRLRLRLNRLRLNNRLRLRL", "train": "LRLRLRLRLRLRLRLRLR", "tvmonitor": "RNLRRNLLRNLRRNLL",
}

_CAT_LIKE = ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12))
_HOOVED = _CAT_LIKE + ((15, 16), (17, 18), (19, 20))
_VEHICLE = ((10, 20), (11, 21), (12, 22), (13, 23), (14, 24), (15, 25), (16, 17), (18, 19), (26, 27), (28, 29))
# category -> (id, id) pairs that swap under a horizontal flip
LEFT_RIGHT_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "aeroplane": tuple((i, i + 1) for i in range(4, 22, 2)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)),
    "boat": tuple((i, i + 1) for i in range(1, 13, 2)),
    "bottle": tuple((i, i + 1) for i in range(0, 10, 2)),
    "bus": ((0, 1), (2, 3), (5, 6)) + _VEHICLE,
    "car": ((0, 1), (2, 3), (6, 7)) + _VEHICLE,
    "cat": _CAT_LIKE,
    "chair": tuple((i, i + 1) for i in range(0, 14, 2)),
    "cow": _HOOVED,
    "dog": ((0, 1), (2, 3), (4, 5), (9, 10), (11, 12)),
    "horse": ((0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((0, 1), (2, 3)) + tuple((i, i + 1) for i in range(8, 20, 2)),
    "pottedplant": ((0, 2), (4, 5), (6, 8)),
    "sheep": _HOOVED,
    "train": tuple((i, i + 1) for i in range(0, 18, 2)),
    "tvmonitor": ((0, 2), (4, 6), (3, 7), (8, 10), (12, 14), (11, 15)),
}


def mirror_partner(category: str) -> dict[int, int] | None:
    """``{id: the id it becomes in the mirrored image}`` (ids without a partner map to themselves), or
    None for a category SPair-71k does not define."""
    pairs = LEFT_RIGHT_PAIRS.get(category)
    if pairs is None:
        return None
    partner = {i: i for i in range(len(SIDES[category]))}
    for a, b in pairs:
        partner[a], partner[b] = b, a
    return partner


def flipped_source_points(points, keypoint_ids, width: int, category: str):
    """Source points for the mirrored source image, and which keypoints may use the flipped predictions.

    The point for id ``i`` is the mirror (``x -> W - x``) of the point of ``i``'s partner when that
    partner is annotated in this pair; a keypoint whose partner is missing is mirrored unswapped and
    keeps its original prediction (the reference's rule: flip only keypoints visible in both).
    Returns ``(points [N, 2], use_flipped [N] bool)``, or None when the pair has no ids or the
    category has no left/right table (then the pair is not flipped).
    """
    partner = mirror_partner(category)
    if partner is None or keypoint_ids is None:
        return None
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    ids = [int(i) for i in keypoint_ids]
    if len(ids) != len(pts):
        raise ValueError(f"{len(ids)} keypoint ids for {len(pts)} keypoints")
    unknown = [i for i in ids if i not in partner]
    if unknown:
        raise ValueError(f"keypoint id(s) {unknown} do not exist for SPair category {category!r} "
                         f"(ids 0..{len(partner) - 1})")
    row = {i: r for r, i in enumerate(ids)}
    source_rows = np.array([row.get(partner[i], r) for r, i in enumerate(ids)], dtype=np.int64)
    use = np.array([partner[i] in row for i in ids], dtype=bool)
    out = pts[source_rows].copy()
    out[:, 0] = width - out[:, 0]
    return out, use


def fit_distance(source: torch.Tensor, target: torch.Tensor, source_mask: torch.Tensor,
                 target_mask: torch.Tensor) -> float:
    """Mean over the source mask's cells of the L2 distance of each unit descriptor to its nearest
    unit descriptor in the target mask (``[D, h, w]`` maps, ``[h, w]`` bool masks).

    For unit vectors ``|a - b| = sqrt(2 - 2 cos)``, so the nearest neighbour is the cosine argmax of
    the native matcher (no cell x cell matrix).
    """
    src = source.flatten(1).T[source_mask.flatten()].float().contiguous()
    trg = target.flatten(1).T[target_mask.flatten()].float().contiguous()
    if len(src) == 0 or len(trg) == 0:
        raise ValueError("an object mask is empty: no cell to compare")
    _, sim = match(src[None], trg[None])
    return float(torch.sqrt((2 - 2 * sim[0].double()).clamp(min=0)).mean())


def box_mask(box, place, grid: int) -> torch.Tensor:
    """``[grid, grid]`` cells whose centre lies in the box ``[x1, y1, x2, y2]`` (original pixels) on the
    canvas of ``place``; the cell under the box centre when none does."""
    x1, y1, x2, y2 = (float(v) for v in box)
    (cx1, cy1), (cx2, cy2) = place.to_canvas([[x1, y1], [x2, y2]])
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * place.size / grid
    inside_x = (centres >= cx1) & (centres <= cx2)
    inside_y = (centres >= cy1) & (centres <= cy2)
    mask = inside_y[:, None] & inside_x[None, :]
    if not mask.any():
        mid = place.to_canvas([[(x1 + x2) / 2, (y1 + y2) / 2]])[0] * grid / place.size
        mask[int(np.clip(mid[1], 0, grid - 1)), int(np.clip(mid[0], 0, grid - 1))] = True
    return mask


def mirrored_box(box, width: int):
    x1, y1, x2, y2 = (float(v) for v in box)
    return (width - x2, y1, width - x1, y2)


def feature_foregrounds(maps) -> list[torch.Tensor]:
    """Foreground masks of ``[D, h, w]`` maps from one PCA over all of them (component 1 thresholded)."""
    from ..viz.pictures import pca_maps

    return [torch.from_numpy(fg) for fg, _ in pca_maps([F.normalize(m.float(), dim=0) for m in maps])]
