"""Two engines' features on the same images, compared per tap: the check of every precision and file.

Engine A is the reference, B the candidate (fp32 vs bf16 vs int8, an ``.onnx`` vs its plan, a
student file vs its export, one encoder vs another). Per tap, over the images:

- ``cosine_min`` / ``cosine_mean``: the cosine between the two engines' whole maps of one image,
  flattened (float64), its smallest and its mean value over the images;
- ``max_rel_error``: the largest ``max |b - a| / max |a|`` of one image's map;
- ``match_agreement``: the share of pixels of image i whose nearest neighbour in image i + 1 (the
  last image pairs with the first; ``cleandift_rt.match``, fp32 cosine) is the same pixel under both
  engines: what dense correspondence sees of the difference.

Maps of different shapes have no cosine (None); when only the channels differ (another encoder),
the agreement is still defined. ``FeatureComparison`` takes one image at a time, so comparing
many images holds three images' features per engine; ``compare_engines`` times each engine too.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..kernels.matching import match


def image_cosines(a, b) -> np.ndarray:
    """Cosine per image between two ``[N, ...]`` feature arrays, each map flattened (float64;
    NaN where either side is not finite or all zero)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    finite = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    return np.where(finite, cos, np.nan)


def max_rel_errors(reference, candidate) -> np.ndarray:
    """``max |candidate - reference| / max |reference|`` per image (float64)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    diff = np.abs(np.asarray(candidate, dtype=np.float64).reshape(len(ref), -1) - ref).max(1)
    return diff / np.maximum(np.abs(ref).max(1), 1e-30)


def nearest(src, dst) -> np.ndarray:
    """Index of the nearest pixel of ``dst`` (``[C, h, w]``) for every pixel of ``src``: ``[h * w]``."""
    index, _ = match(torch.as_tensor(np.asarray(src, np.float32))[None],
                     torch.as_tensor(np.asarray(dst, np.float32))[None], precision="fp32")
    return index[0].numpy()


class FeatureComparison:
    """Per-tap statistics of engine B against engine A, fed one image at a time (``add``)."""

    def __init__(self, taps: Sequence[str]):
        self.taps = tuple(taps)
        self.cosines: dict[str, list[float]] = {t: [] for t in self.taps}
        self.errors: dict[str, list[float]] = {t: [] for t in self.taps}
        self.same: dict[str, list[int]] = {t: [0, 0] for t in self.taps}  # [agreeing pixels, pixels]
        self.shapes: dict[str, tuple] = {}
        self._first = self._previous = None
        self.count = 0

    def add(self, features_a: dict, features_b: dict) -> dict[str, float | None]:
        """One image's maps (``[C, h, w]`` or ``[1, C, h, w]``) from both engines; returns its cosine per tap."""
        one = ({t: _one(features_a[t]) for t in self.taps}, {t: _one(features_b[t]) for t in self.taps})
        out = {}
        for tap in self.taps:
            a, b = one[0][tap], one[1][tap]
            self.shapes.setdefault(tap, (a.shape, b.shape))
            if a.shape == b.shape:
                self.cosines[tap].append(float(image_cosines(a[None], b[None])[0]))
                self.errors[tap].append(float(max_rel_errors(a[None], b[None])[0]))
            out[tap] = self.cosines[tap][-1] if a.shape == b.shape else None
        if self._previous is not None:
            self._pair(self._previous, one)
        if self._first is None:
            self._first = one
        self._previous = one
        self.count += 1
        return out

    def _pair(self, src, dst) -> None:
        for tap in self.taps:
            (a_src, b_src), (a_dst, b_dst) = (src[0][tap], src[1][tap]), (dst[0][tap], dst[1][tap])
            if a_src.shape[1:] != b_src.shape[1:] or a_dst.shape[1:] != b_dst.shape[1:]:
                continue  # different grids: pixel indices do not correspond
            agree = nearest(a_src, a_dst) == nearest(b_src, b_dst)
            self.same[tap][0] += int(agree.sum())
            self.same[tap][1] += agree.size

    def result(self) -> dict[str, dict]:
        """``{tap: {cosine_min, cosine_mean, max_rel_error, match_agreement, shape_a, shape_b}}``; the
        last image is paired with the first here (no agreement with fewer than two images)."""
        if self.count >= 2:
            self._pair(self._previous, self._first)
        self._first = self._previous = None  # result() closes the cycle once
        out = {}
        for tap in self.taps:
            cos, err, (agree, total) = self.cosines[tap], self.errors[tap], self.same[tap]
            shape_a, shape_b = self.shapes.get(tap, ((), ()))
            out[tap] = {"cosine_min": _stat(np.min, cos), "cosine_mean": _stat(np.mean, cos),
                        "max_rel_error": _stat(np.max, err), "match_agreement": agree / total if total else None,
                        "shape_a": list(shape_a), "shape_b": list(shape_b)}
        return out


def worst(per_tap: dict[str, dict], key: str) -> tuple[str, float] | None:
    """(tap, value) of the tap with the smallest ``key`` (NaN counts as worst); None when no tap has one."""
    values = [(t, r[key]) for t, r in per_tap.items() if r.get(key) is not None]
    if not values:
        return None
    return min(values, key=lambda tv: -np.inf if np.isnan(tv[1]) else tv[1])


def common_taps(taps_a: Sequence[str], taps_b: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """The taps to compare: ``wanted`` (each in both engines), else every tap the two share."""
    if wanted:
        missing = {side: [t for t in wanted if t not in have] for side, have in (("A", taps_a), ("B", taps_b))}
        missing = {side: taps for side, taps in missing.items() if taps}
        if missing:
            raise ValueError("; ".join(f"engine {side} has no {', '.join(taps)}" for side, taps in missing.items()) +
                             f" (A has {', '.join(taps_a)}; B has {', '.join(taps_b)}): choose --taps both have")
        return list(wanted)
    shared = [t for t in taps_a if t in taps_b]
    if not shared:
        raise ValueError(f"the engines share no tap (A has {', '.join(taps_a)}; B has {', '.join(taps_b)})")
    return shared


def compare_engines(engine_a, engine_b, images: Iterable, taps: Sequence[str] | None = None,
                    progress: Callable[[int, dict], None] | None = None) -> dict:
    """Both engines on every image (one at a time, each after one untimed warm-up call), compared per tap.

    ``images``: anything ``Engine.extract`` takes as one image (a PIL image, a uint8 array). Returns
    ``{"images", "pairs", "taps": {tap: stats}, "seconds_per_image": {"a", "b"}, "worst": {...}}``.
    ``progress(index, cosines)`` is called after each image.
    """
    taps = common_taps(engine_a.taps, engine_b.taps, taps)
    comparison = FeatureComparison(taps)
    seconds = {"a": 0.0, "b": 0.0}
    warm = False
    for index, image in enumerate(images):
        if not warm:  # first-call set-up (memory plans, kernel choice) is not per-image time
            engine_a.extract([image], taps=taps), engine_b.extract([image], taps=taps)
            warm = True
        feats = {}
        for side, engine in (("a", engine_a), ("b", engine_b)):
            t0 = time.perf_counter()
            feats[side] = engine.extract([image], taps=taps)
            seconds[side] += time.perf_counter() - t0
        cosines = comparison.add(feats["a"], feats["b"])
        if progress is not None:
            progress(index, cosines)
    n = comparison.count
    if n == 0:
        raise ValueError("no images to compare")
    per_tap = comparison.result()
    return {"images": n, "pairs": n if n >= 2 else 0, "taps": per_tap,
            "seconds_per_image": {side: s / n for side, s in seconds.items()},
            "worst": {key: worst(per_tap, key) for key in ("cosine_min", "match_agreement")}}


def _one(x) -> np.ndarray:
    """One image's map as a ``[C, h, w]`` float32 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x[0] if x.ndim == 4 else x


def _stat(fn, values: list[float]) -> float | None:
    return float(fn(values)) if values else None


__all__ = ["FeatureComparison", "compare_engines", "common_taps", "image_cosines", "max_rel_errors", "nearest",
           "worst"]
