"""Keypoint transfer with a fusion recipe over a list of pairs: the raw maps of every image (and of
the mirrored source) cached on disk, a journal that makes an interrupted run resume exactly, skips
counted by the same rules as ``evaluation.runner``, and the PCK of docs/method.md, evaluation protocol on the results.

The raw maps, not the descriptors, are cached: the SD part under a key of the engine, canvas,
crop scheme and prompt, the DINO part under a key of the weights and canvas, so ``tale``, ``tlfr``
and every ablation share them (``tale``'s PCA is per pair and cheap). A source image's mirror is
cached beside it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import short_hash
from ..evaluation.pairs import Pair
from ..evaluation.runner import EvalRun, FeatureCache, ImageFailure, Journal, load_pair_image, run_pairs, score_pair
from ..runs.skips import SkipLog
from .canvas import flip_images
from .pipeline import Fusion

PROTOCOL_VERSION = 1  # bump when a change alters per-pair results (invalidates journals, not the raw maps)


class RawMaps:
    """One cached part of a fusion recipe's raw maps (the SD taps, or the DINOv2 features) as a
    ``features.source.FeatureSource``: ``compute(image, category)`` -> ``{name: [C, h, w]}``."""

    def __init__(self, name: str, key: str, compute: Callable[[object, str], dict]):
        self.name, self.key, self._compute = name, key, compute

    def compute(self, image, category: str = "") -> dict:
        return self._compute(image, category)

    def describe(self) -> dict:
        return {"method": self.name}


class FusedSource:
    """A :class:`pipeline.Fusion` with the identities that name its caches and journal.

    ``sd_key`` identifies the engine (file, size, policy) and the prompt; ``dino_key`` the DINOv2
    weights (both are hashed with the recipe's canvas settings here). ``parts`` are the
    :class:`RawMaps` each run caches per image: SD, then DINOv2 when the recipe uses it.
    """

    def __init__(self, fusion: Fusion, sd_key: str, dino_key: str | None, prompt: str):
        self.fusion, self.recipe = fusion, fusion.recipe
        r = self.recipe
        self.name = r.label()
        self.sd_key = short_hash("fusion-sd", sd_key, r.sd_size, r.sd_crop, prompt)
        self.dino_key = short_hash("fusion-dino", dino_key, r.dino_size) if r.dino else None
        self.key = short_hash(self.name, self.sd_key, self.dino_key, sorted(r.describe().items()))
        self.prompt = prompt
        self.parts = [RawMaps("fusion-sd", self.sd_key, lambda image, category: fusion.sd_raw([image], category)[0])]
        if r.dino:
            self.parts.append(RawMaps("fusion-dino", self.dino_key,
                                      lambda image, category: fusion.dino_raw([image])[0]))

    def describe(self) -> dict:
        return {**self.fusion.describe(), "prompt": self.prompt}


def evaluate_fused(pairs: list[Pair], source: FusedSource, *, cache_dir: str | Path | None = None,
                   journal: str | Path | None = None, resume: bool = True, skips: SkipLog | None = None,
                   progress: bool = True) -> EvalRun:
    """Transfer every pair's keypoints with ``source``'s recipe; per-pair results as ``evaluation.evaluate``.

    The run's ``source`` dict also counts the flip decisions (``flipped``, ``kept``, ``not
    applicable``: no keypoint ids or no left/right table for the category).
    """
    skips = skips if skips is not None else SkipLog("pair")
    fusion = source.fusion
    caches = [(part, FeatureCache(cache_dir, part.key, memory_items=6)) for part in source.parts]
    log = Journal(journal, short_hash(source.key, PROTOCOL_VERSION), resume)
    broken: dict[Path, ImageFailure] = {}
    timing = {"extract": 0.0}
    decisions: Counter = Counter()
    start = time.perf_counter()

    def raw(path: Path, category: str, flipped: bool) -> dict:
        if path in broken:
            raise broken[path]
        image = None

        def picture():
            nonlocal image
            if image is None:
                image = load_pair_image(path)
                image = flip_images([image])[0] if flipped else image
            return image

        def timed(fn):
            def run():
                t0 = time.perf_counter()
                try:
                    return fn()
                except (ValueError, TypeError) as exc:
                    raise ImageFailure("feature extraction failed", f"{path}: {exc}") from None
                finally:
                    timing["extract"] += time.perf_counter() - t0
            return run

        try:
            variant = "-flip" if flipped else ""
            maps = {}
            for part, cache in caches:
                maps.update(cache.get_maps(path, category, timed(lambda part=part: part.compute(picture(), category)),
                                           variant))
            return maps
        except ImageFailure as exc:
            broken[path] = exc
            raise

    def count_decision(rec: dict) -> None:
        decisions[{True: "flipped", False: "kept", None: "not applicable"}[rec.get("flipped")]] += 1

    results, resumed = run_pairs(pairs, log, skips, lambda pair: _score(pair, fusion, raw), f"PCK {source.name}",
                                 progress, on_record=count_decision)
    described = source.describe()
    if source.recipe.flip:
        described["flip_decisions"] = dict(decisions)
    return EvalRun(source=described, results=results, skips=skips, seconds=time.perf_counter() - start,
                   images_extracted=max(c.misses for _, c in caches), images_cached=min(c.hits for _, c in caches),
                   resumed_pairs=resumed, extract_seconds=timing["extract"])


def _score(pair: Pair, fusion: Fusion, raw) -> dict:
    def prepare(sizes, keep):
        ids = None if pair.keypoint_ids is None else [i for i, k in zip(pair.keypoint_ids, keep) if k]
        raw_src = raw(pair.source, pair.category, False)
        raw_trg = raw(pair.target, pair.category, False)
        raw_flip = raw(pair.source, pair.category, True) if fusion.recipe.flip else None

        def transfer():
            t = fusion.transfer_raw(raw_src, raw_trg, sizes[0], sizes[1], pair.source_points[keep],
                                    raw_flipped=raw_flip, category=pair.category, keypoint_ids=ids,
                                    source_bbox=pair.source_bbox, target_bbox=pair.target_bbox)
            return t.points, {"flipped": t.flipped, "fit": None if t.fit is None else [round(v, 6) for v in t.fit],
                              "masks": t.masks}

        return transfer

    return score_pair(pair, prepare)
