"""Keypoint transfer with a fusion recipe over a list of pairs: the raw maps of every image (and of
the mirrored source) cached on disk, a journal that makes an interrupted run resume exactly, skips
counted by the same rules as ``evaluation.runner``, and the PCK of SPEC section 6 on the results.

The raw maps, not the descriptors, are cached: the SD part under a key of the engine, canvas,
crop scheme and prompt, the DINO part under a key of the weights and canvas, so ``tale``, ``tlfr``
and every ablation share them (``tale``'s PCA is per pair and cheap). A source image's mirror is
cached beside it.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..evaluation.pairs import Pair, SkipLog
from ..evaluation.pck import PairResult, bbox_size
from ..evaluation.runner import (EvalRun, FeatureCache, ImageFailure, Journal, image_size, inside_image,
                                 load_pair_image, short_hash)
from .canvas import flip_images
from .pipeline import Fusion

PROTOCOL_VERSION = 1  # bump when a change alters per-pair results (invalidates journals, not the raw maps)


class FusedSource:
    """A :class:`pipeline.Fusion` with the identities that name its caches and journal.

    ``sd_key`` identifies the engine (file, size, policy) and the prompt; ``dino_key`` the DINOv2
    weights (both are hashed with the recipe's canvas settings here).
    """

    def __init__(self, fusion: Fusion, sd_key: str, dino_key: str | None, prompt: str):
        self.fusion, self.recipe = fusion, fusion.recipe
        r = self.recipe
        self.name = r.label()
        self.sd_key = short_hash("fusion-sd", sd_key, r.sd_size, r.sd_crop, prompt)
        self.dino_key = short_hash("fusion-dino", dino_key, r.dino_size) if r.dino else None
        self.key = short_hash(self.name, self.sd_key, self.dino_key, sorted(r.describe().items()))
        self.prompt = prompt

    def describe(self) -> dict:
        return {**self.fusion.describe(), "prompt": self.prompt}


def evaluate_fused(pairs: list[Pair], source: FusedSource, *, cache_dir: str | Path | None = None,
                   journal: str | Path | None = None, resume: bool = True, skips: SkipLog | None = None,
                   progress: bool = True) -> EvalRun:
    """Transfer every pair's keypoints with ``source``'s recipe; per-pair results as ``evaluation.evaluate``.

    The run's ``source`` dict also counts the flip decisions (``flipped``, ``kept``, ``not
    applicable``: no keypoint ids or no left/right table for the category).
    """
    from tqdm.auto import tqdm

    skips = skips if skips is not None else SkipLog()
    fusion = source.fusion
    sd_cache = FeatureCache(cache_dir, source.sd_key, memory_items=6)
    dino_cache = FeatureCache(cache_dir, source.dino_key, memory_items=6) if source.dino_key else None
    log = Journal(journal, short_hash(source.key, PROTOCOL_VERSION), resume)
    broken: dict[Path, ImageFailure] = {}
    timing = {"extract": 0.0}
    decisions: Counter = Counter()
    results: list[PairResult] = []
    resumed = 0
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
            maps = dict(sd_cache.get_maps(path, category, timed(lambda: fusion.sd_raw([picture()], category)[0]),
                                          variant))
            if dino_cache is not None:
                maps.update(dino_cache.get_maps(path, category, timed(lambda: fusion.dino_raw([picture()])[0]), variant))
            return maps
        except ImageFailure as exc:
            broken[path] = exc
            raise

    bar = tqdm(pairs, desc=f"PCK {source.name}", unit="pair", disable=not progress, dynamic_ncols=True)
    for pair in bar:
        rec = log.done.get(pair.pair_id)
        if rec is None:
            rec = _evaluate_pair(pair, fusion, raw)
            log.add(rec)
        else:
            resumed += 1
        if "skip" in rec:
            skips.skip_pair(rec["skip"], rec.get("where", pair.pair_id))
            continue
        for reason, n in rec.get("dropped", {}).items():
            skips.skip_keypoints(reason, n, pair.pair_id)
        decisions[{True: "flipped", False: "kept", None: "not applicable"}[rec.get("flipped")]] += 1
        results.append(PairResult.from_json(rec["result"]))
    bar.close()
    described = source.describe()
    if source.recipe.flip:
        described["flip_decisions"] = dict(decisions)
    caches = [sd_cache] + ([dino_cache] if dino_cache else [])
    return EvalRun(source=described, results=results, skips=skips, seconds=time.perf_counter() - start,
                   images_extracted=max(c.misses for c in caches), images_cached=min(c.hits for c in caches),
                   resumed_pairs=resumed, extract_seconds=timing["extract"])


def _evaluate_pair(pair: Pair, fusion: Fusion, raw) -> dict:
    try:
        sizes = []
        for path, annotated in ((pair.source, pair.source_size), (pair.target, pair.target_size)):
            size = image_size(path)
            if annotated is not None and tuple(annotated) != size:
                raise ImageFailure("image size differs from its annotation", f"{path}: {size} vs {tuple(annotated)}")
            sizes.append(size)
        keep = inside_image(pair.source_points, sizes[0]) & inside_image(pair.target_points, sizes[1])
        dropped = {"keypoint outside its image": int((~keep).sum())} if not keep.all() else {}
        if not keep.any():
            raise ImageFailure("no keypoint inside both images", pair.pair_id)
        src_pts, trg_pts = pair.source_points[keep], pair.target_points[keep]
        ids = None if pair.keypoint_ids is None else [i for i, k in zip(pair.keypoint_ids, keep) if k]
        raw_src = raw(pair.source, pair.category, False)
        raw_trg = raw(pair.target, pair.category, False)
        raw_flip = raw(pair.source, pair.category, True) if fusion.recipe.flip else None
    except ImageFailure as exc:
        return {"pair_id": pair.pair_id, "skip": exc.reason, "where": exc.where or pair.pair_id}
    transfer = fusion.transfer_raw(raw_src, raw_trg, sizes[0], sizes[1], src_pts, raw_flipped=raw_flip,
                                   category=pair.category, keypoint_ids=ids, source_bbox=pair.source_bbox,
                                   target_bbox=pair.target_bbox)
    distances = np.linalg.norm(transfer.points - trg_pts, axis=1)
    if pair.target_bbox is not None:
        box_size = bbox_size(pair.target_bbox)
    else:  # no annotated box: the extent of the target keypoints (ProposalFlow's PCK@bbox)
        extent = float((trg_pts.max(0) - trg_pts.min(0)).max()) if len(trg_pts) > 1 else 0.0
        box_size = extent if extent > 0 else None
    result = PairResult(pair.pair_id, pair.category, distances, box_size, float(max(sizes[1])), transfer.points)
    return {"pair_id": pair.pair_id, "result": result.to_json(), "dropped": dropped, "flipped": transfer.flipped,
            "fit": None if transfer.fit is None else [round(v, 6) for v in transfer.fit], "masks": transfer.masks}
