"""PCK: the percentage of correctly transferred keypoints, in every convention papers use.

A transferred keypoint is correct when its distance to the ground truth, in pixels of the
original target image, is within ``alpha * size`` where ``size`` is

- ``bbox``: ``max(bbox_w, bbox_h)`` of the target object's bounding box (PCK@alpha_bbox),
- ``img``:  ``max(W, H)`` of the target image (PCK@alpha_img).

Two choices change the numbers and are often confused, so both are explicit here:

- the comparison: ``<=`` (DIFT's evaluation code, our default, ``inclusive=True``) or ``<``
  ("Telling Left from Right" / "A Tale of Two Features", ``inclusive=False``);
- the average: ``point`` pools all keypoints of all pairs (what DIFT and CleanDIFT report),
  ``image`` averages the per-pair accuracies (what most correspondence papers report).

Values are percentages (0-100), as in the papers' tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALPHAS = (0.05, 0.1, 0.15)
KINDS = ("bbox", "img")
AVERAGES = ("point", "image")
CONVENTIONS = {"dift": True, "tlfr": False}  # name -> inclusive comparison
COMPARISON = {True: "<=", False: "<"}


def alpha_key(alpha: float) -> str:
    """The JSON key of an alpha: ``0.1 -> "0.1"``, ``0.05 -> "0.05"``."""
    return f"{float(alpha):g}"


@dataclass
class PairResult:
    """One evaluated pair: per-keypoint transfer errors and the two reference sizes of its target."""

    pair_id: str
    category: str
    distances: np.ndarray  # [N] pixels in the original target image
    bbox_size: float | None  # max(bbox_w, bbox_h), None when the pair has no target box
    img_size: float  # max(W, H) of the target image
    predictions: np.ndarray | None = field(default=None, repr=False)  # [N, 2] x, y in the target image

    def size(self, kind: str) -> float | None:
        return self.bbox_size if kind == "bbox" else self.img_size

    def to_json(self) -> dict:
        out = {"pair_id": self.pair_id, "category": self.category,
               "distances": [round(float(d), 4) for d in self.distances],
               "bbox_size": self.bbox_size, "img_size": self.img_size}
        if self.predictions is not None:
            out["predictions"] = np.asarray(self.predictions).tolist()
        return out

    @classmethod
    def from_json(cls, d: dict) -> "PairResult":
        preds = d.get("predictions")
        return cls(pair_id=d["pair_id"], category=d["category"], distances=np.asarray(d["distances"], dtype=np.float64),
                   bbox_size=d["bbox_size"], img_size=float(d["img_size"]),
                   predictions=None if preds is None else np.asarray(preds, dtype=np.float64))


def bbox_size(bbox) -> float:
    """``max(x2 - x1, y2 - y1)`` of an ``[x1, y1, x2, y2]`` box (DIFT's definition, no +1)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"bounding box {list(bbox)} is not [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return max(x2 - x1, y2 - y1)


def correct(distances, threshold: float, inclusive: bool = True) -> np.ndarray:
    """Boolean mask of correct keypoints: ``d <= threshold`` (inclusive) or ``d < threshold``."""
    d = np.asarray(distances, dtype=np.float64)
    return d <= threshold if inclusive else d < threshold


def _pair_correct(r: PairResult, kind: str, alpha: float, inclusive: bool) -> np.ndarray | None:
    size = r.size(kind)
    if size is None:
        return None
    return correct(r.distances, alpha * size, inclusive)


def _table(results: list[PairResult], alphas, inclusive: bool) -> dict:
    """``{kind: {alpha: {"point": %, "image": %}}}``; None where no pair has the reference size."""
    table: dict = {}
    for kind in KINDS:
        table[kind] = {}
        for alpha in alphas:
            hits, per_pair = [], []
            for r in results:
                c = _pair_correct(r, kind, alpha, inclusive)
                if c is None or c.size == 0:
                    continue
                hits.append(c)
                per_pair.append(c.mean())
            point = 100.0 * float(np.concatenate(hits).mean()) if hits else None
            image = 100.0 * float(np.mean(per_pair)) if per_pair else None
            table[kind][alpha_key(alpha)] = {"point": point, "image": image}
    return table


def summarize(results: list[PairResult], alphas=ALPHAS, inclusive: bool = True) -> dict:
    """PCK over all pairs, per category, and the mean over categories.

    Returns ``{"pck": {kind: {alpha: {"point", "image"}}}, "per_category": {cat: {"pck": ...,
    "pairs": n, "keypoints": n}}, "category_mean": {kind: {alpha: {...}}}, "counts": {"pairs",
    "keypoints"}, "comparison": "<=" or "<"}``.
    """
    alphas = tuple(alphas)
    by_cat: dict[str, list[PairResult]] = {}
    for r in results:
        by_cat.setdefault(r.category, []).append(r)
    per_category = {cat: {"pck": _table(rs, alphas, inclusive), "pairs": len(rs),
                          "keypoints": int(sum(len(r.distances) for r in rs))}
                    for cat, rs in sorted(by_cat.items())}
    category_mean: dict = {}
    for kind in KINDS:
        category_mean[kind] = {}
        for alpha in alphas:
            a = alpha_key(alpha)
            category_mean[kind][a] = {}
            for avg in AVERAGES:
                vals = [c["pck"][kind][a][avg] for c in per_category.values() if c["pck"][kind][a][avg] is not None]
                category_mean[kind][a][avg] = float(np.mean(vals)) if vals else None
    return {"pck": _table(results, alphas, inclusive), "per_category": per_category, "category_mean": category_mean,
            "counts": {"pairs": len(results), "keypoints": int(sum(len(r.distances) for r in results))},
            "comparison": COMPARISON[inclusive]}


def spair_validator(items, alpha: float = 0.1) -> float:
    """PCK@alpha bbox per point (a fraction) of ``(pair, source map, target map)`` triples: the
    validator training runs pass around (``hyper.train.HyperTrainer(validator=...)``).

    Each ``pair`` gives ``pair_id``, ``category``, ``source_size`` / ``target_size`` (W, H),
    ``source_points`` / ``target_points`` and ``target_bbox`` (pairs without one are left out).
    Each source keypoint goes to the target pixel of highest cosine similarity of the descriptor
    maps upsampled bilinearly to the image sizes (``transfer.transfer_points``, closed form);
    correct when within ``alpha * max(bbox_w, bbox_h)`` (DIFT's ``<=``).
    """
    from .transfer import transfer_points

    results = []
    for item, source, target in items:
        if item.target_bbox is None:
            continue
        pred, _ = transfer_points(source, target, item.source_size, item.target_size, item.source_points,
                                  method="analytic")
        distances = np.linalg.norm(pred - item.target_points, axis=1)
        results.append(PairResult(item.pair_id, item.category, distances, bbox_size(item.target_bbox),
                                  float(max(item.target_size))))
    if not results:
        raise ValueError("no validation pair has a target bounding box: PCK@bbox is undefined")
    return summarize(results, alphas=(alpha,))["pck"]["bbox"][alpha_key(alpha)]["point"] / 100
