"""Run keypoint transfer over a list of pairs: features once per image (cached on disk), a progress
bar, a journal that makes an interrupted run resume where it stopped, and skips that are counted.

A *feature source* is anything with ``name``, ``key`` (identifies the model and every setting that
changes its features: it names the cache folder and the journal) and ``features(image, category)
-> [C, h, w]``: a ``features.source.DescriptorSource``, or any object with these. :class:`EngineFeatures`
wraps a ``cleandift_rt.Engine`` (or any object with its ``extract``), :class:`DiftFeatures` the noisy
DIFT baseline. The features are kept in a ``features.store.FeatureStore`` (:class:`FeatureCache`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import short_hash
from ..checks import loads_json
from ..features.preprocess import load_image
from ..features.source import DescriptorSource, tap_map
from ..features.store import FeatureStore, image_key
from ..runs.skips import SkipLog
from ..taps import resolve_taps
from .pairs import Pair
from .pck import PairResult, bbox_size
from .transfer import transfer_points

PROTOCOL_VERSION = 1  # bump when a change alters per-pair results (invalidates journals, not features)
DEFAULT_PROMPT = "a photo of a {category}"


class _PromptEmbeddings:
    """``prompt.format(category=...)`` through a base model's text encoder, or None for the model's baked prompt."""

    def __init__(self, prompt: str | None, text_model=None):
        self.prompt = prompt
        self.text_model = text_model
        if prompt is not None and text_model is None:
            raise ValueError(f"prompt {prompt!r} needs a text encoder: pass the base model (--base DIR), "
                             "or use the engine's baked prompt (--prompt '')")

    def __call__(self, category: str):
        if self.prompt is None:
            return None
        return self.text_model.encode_prompt(self.prompt.format(category=category))

    def describe(self) -> str:
        return "<baked into the model>" if self.prompt is None else self.prompt


class EngineFeatures(DescriptorSource):
    """CleanDIFT features from an Engine: one pass per image at the engine's size and resize policy."""

    def __init__(self, engine, tap: str, key: str, prompt: str | None = None, text_model=None, name: str = "cleandift"):
        resolve_taps(tap)
        taps = getattr(engine, "taps", None)
        if taps is not None and tap not in taps:
            raise ValueError(f"the engine has no tap {tap!r} (it has {', '.join(taps)}): choose --tap from those, "
                             f"or re-export the model with --taps {tap}")
        self.engine, self.tap, self.name = engine, tap, name
        self.prompts = _PromptEmbeddings(prompt, text_model)
        self.key = short_hash(name, key, tap, self.prompts.describe())

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        embeds = self.prompts(category)
        kwargs = {} if embeds is None else {"prompt_embeds": embeds}
        out = self.engine.extract([image], taps=[self.tap], **kwargs)
        return {self.tap: tap_map(out[self.tap], self.tap)}

    def describe(self) -> dict:
        return {"method": self.name, "tap": self.tap, "prompt": self.prompts.describe()}


class DiftFeatures(DescriptorSource):
    """The noisy DIFT baseline (docs/method.md, noisy baseline) through ``extractor.DiftExtractor``."""

    def __init__(self, extractor, tap: str, key: str, prompt: str | None = DEFAULT_PROMPT, name: str = "dift"):
        resolve_taps(tap)
        self.extractor, self.tap, self.name = extractor, tap, name
        self.prompts = _PromptEmbeddings(prompt, extractor.base if prompt is not None else None)
        self.key = short_hash(name, key, tap, extractor.t, extractor.ensemble, extractor.seed, extractor.size,
                              self.prompts.describe())

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        embeds = self.prompts(category)
        out = self.extractor.extract([image], taps=[self.tap], prompt_embeds=embeds)
        return {self.tap: tap_map(out[self.tap], self.tap)}

    def describe(self) -> dict:
        e = self.extractor
        return {"method": self.name, "tap": self.tap, "prompt": self.prompts.describe(), "t": e.t,
                "ensemble": e.ensemble, "seed": e.seed, "size": list(e.size)}


class FeatureCache:
    """One source's maps per (image, category) in a :class:`FeatureStore`, as tensors:
    ``DIR/<source key>/<image key>[variant].safetensors``, the last ``memory_items`` in memory too.

    ``get`` keeps one feature tensor per image; ``get_maps`` a dict of named tensors (the fusion
    recipes keep every raw map, and a mirrored ``variant`` of the source beside it). The maps are
    stored as computed: PCK is measured on the features themselves, not on an fp16 rounding of them.
    """

    def __init__(self, root: str | Path | None, source_key: str, memory_items: int = 8):
        self.store = FeatureStore(root, dtype=None, memory_items=memory_items)
        self.source_key = source_key

    @property
    def hits(self) -> int:
        return self.store.reused.total()

    @property
    def misses(self) -> int:
        return self.store.computed.total()

    def get(self, image_path: Path, category: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.get_maps(image_path, category, lambda: {"features": compute()})["features"]

    def get_maps(self, image_path: Path, category: str, compute: Callable[[], dict[str, torch.Tensor]],
                 variant: str = "") -> dict[str, torch.Tensor]:
        maps = self.store.get(self.source_key, image_key(image_path, category, variant), compute)
        return {name: torch.from_numpy(value) for name, value in maps.items()}


class Journal:
    """One JSON line per finished pair; a rerun reads it back and skips those pairs."""

    def __init__(self, path: str | Path | None, key: str, resume: bool = True):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.done: dict[str, dict] = {}
        if self.path is None:
            return
        if resume and self.path.is_file():
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"journal": "cleandift-rt pck", "key": key}) + "\n")

    def _read(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = loads_json(lines[0], f"{self.path} header") if lines else {}
        except ValueError:
            header = {}
        header = header if isinstance(header, dict) else {}
        if header.get("key") != self.key:
            raise ValueError(f"{self.path} belongs to another run (key {header.get('key')} != {self.key}): "
                             "delete it or pass --restart")
        for line in lines[1:]:
            try:
                rec = loads_json(line, f"{self.path} line")
                self.done[rec["pair_id"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the previous run was killed

    def add(self, record: dict) -> None:
        self.done[record["pair_id"]] = record
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


@dataclass
class EvalRun:
    """Per-pair results of one method, what was skipped, and how the time went."""

    source: dict
    results: list[PairResult]
    skips: SkipLog
    seconds: float
    images_extracted: int = 0
    images_cached: int = 0
    resumed_pairs: int = 0
    extract_seconds: float = 0.0


class ImageFailure(Exception):
    """A pair cannot be evaluated: ``reason`` is what the report counts, ``where`` names the file."""

    def __init__(self, reason: str, where: str = ""):
        super().__init__(reason)
        self.reason, self.where = reason, where


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ImageFailure("image file missing", str(path))
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError):
        raise ImageFailure("image cannot be decoded", str(path)) from None


def load_pair_image(path: Path):
    try:  # SPair's keypoints refer to the stored pixel layout: no EXIF rotation
        return load_image(path, exif_orientation=False)
    except (ValueError, OSError):
        raise ImageFailure("image cannot be decoded", str(path)) from None


def inside_image(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)


def evaluate(pairs: list[Pair], source, *, cache_dir: str | Path | None = None, journal: str | Path | None = None,
             resume: bool = True, skips: SkipLog | None = None, progress: bool = True, matcher=None,
             method: str = "matcher") -> EvalRun:
    """Transfer every pair's keypoints with ``source``'s features and return per-pair errors.

    A pair is skipped (and counted by reason) when an image is missing, cannot be decoded, differs
    in size from its annotation, or fails feature extraction; keypoints outside their image are
    dropped (and counted). ``journal`` (a ``.jsonl`` path) makes the run resumable. ``method``:
    ``"matcher"`` (the native matcher on the upsampled target) or ``"analytic"`` (the same cosines
    in closed form), see :func:`transfer.transfer_points`.
    """
    skips = skips if skips is not None else SkipLog("pair")
    cache = FeatureCache(cache_dir, source.key)
    log = Journal(journal, short_hash(source.key, PROTOCOL_VERSION, method), resume)
    broken: dict[Path, ImageFailure] = {}
    extract_seconds = 0.0
    start = time.perf_counter()

    def features(path: Path, category: str) -> torch.Tensor:
        nonlocal extract_seconds

        def compute():
            nonlocal extract_seconds
            t0 = time.perf_counter()
            image = load_pair_image(path)
            try:
                return source.features(image, category)
            except (ValueError, TypeError) as exc:
                raise ImageFailure("feature extraction failed", f"{path}: {exc}") from None
            finally:
                extract_seconds += time.perf_counter() - t0

        if path in broken:
            raise broken[path]
        try:
            return cache.get(path, category, compute)
        except ImageFailure as exc:
            broken[path] = exc
            raise

    def score(pair: Pair) -> dict:
        def prepare(sizes, keep):
            src_feat, trg_feat = features(pair.source, pair.category), features(pair.target, pair.category)
            return lambda: (transfer_points(src_feat, trg_feat, sizes[0], sizes[1], pair.source_points[keep], matcher,
                                            method=method)[0], {})

        return score_pair(pair, prepare)

    results, resumed = run_pairs(pairs, log, skips, score, f"PCK {source.name}", progress)
    return EvalRun(source=source.describe(), results=results, skips=skips, seconds=time.perf_counter() - start,
                   images_extracted=cache.misses, images_cached=cache.hits, resumed_pairs=resumed,
                   extract_seconds=extract_seconds)


def run_pairs(pairs: list[Pair], journal: Journal, skips: SkipLog, score: Callable[[Pair], dict], desc: str,
              progress: bool, on_record: Callable[[dict], None] | None = None) -> tuple[list[PairResult], int]:
    """The PCK pair loop: each pair's record from ``journal`` (a resumed run) or from ``score(pair)``
    (then journaled), its skips and dropped keypoints counted in ``skips``, ``on_record`` called on
    every scored record. A journaled skip is never replayed: the pair is scored again (an image
    missing then may be there now). Returns the per-pair results and how many came from the journal."""
    from tqdm.auto import tqdm

    results: list[PairResult] = []
    resumed = 0
    bar = tqdm(pairs, desc=desc, unit="pair", disable=not progress, dynamic_ncols=True)
    for pair in bar:
        rec = journal.done.get(pair.pair_id)
        if rec is None or "skip" in rec:  # a skip is checked again: the image may have been added or fixed
            rec = score(pair)
            journal.add(rec)
        else:
            resumed += 1
        if "skip" in rec:
            skips.add(rec["skip"], rec.get("where", pair.pair_id))
            continue
        for reason, n in rec.get("dropped", {}).items():
            skips.drop(reason, n, pair.pair_id)
        if on_record is not None:
            on_record(rec)
        results.append(PairResult.from_json(rec["result"]))
    bar.close()
    return results, resumed


def score_pair(pair: Pair, prepare) -> dict:
    """One pair's journal record: image sizes checked against the annotation, keypoints outside
    either image dropped, then ``prepare(sizes, keep)`` fetches what the transfer needs (raising
    :class:`ImageFailure` skips the pair) and returns ``transfer() -> (predicted target points,
    extra record fields)``; the distances and the PCK box follow the same rules for every method."""
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
        transfer = prepare(sizes, keep)
    except ImageFailure as exc:
        return {"pair_id": pair.pair_id, "skip": exc.reason, "where": exc.where or pair.pair_id}
    predicted, extra = transfer()
    trg_pts = pair.target_points[keep]
    distances = np.linalg.norm(predicted - trg_pts, axis=1)
    if pair.target_bbox is not None:
        box_size = bbox_size(pair.target_bbox)
    else:  # no annotated box: the extent of the target keypoints (ProposalFlow's PCK@bbox)
        extent = float((trg_pts.max(0) - trg_pts.min(0)).max()) if len(trg_pts) > 1 else 0.0
        box_size = extent if extent > 0 else None
    result = PairResult(pair.pair_id, pair.category, distances, box_size, float(max(sizes[1])), predicted)
    return {"pair_id": pair.pair_id, "result": result.to_json(), "dropped": dropped, **extra}
