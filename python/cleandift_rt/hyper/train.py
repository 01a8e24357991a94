"""Training the aggregation network on keypoint pairs (docs/method.md, Diffusion Hyperfeatures): cached features, exact resume.

Output folder::

    OUT/features/<source key>/*.safetensors  each image's stored features, fp16 (features.store; --cache)
    OUT/checkpoints/step-0001000.safetensors network, AdamW moments, RNG, pair cursor (atomic; last K kept)
    OUT/metrics.jsonl                        {"step", "loss", ...} per step; {"step", "val_pck"} per validation
    OUT/aggregator.safetensors               the trained Aggregator (config, source, heads in it)
    OUT/mixing_weights.png                   the layers x timesteps heat map of its mixing weights

One image pair per step: step k takes the next usable pair of a seeded permutation of the training
pairs (a new permutation per pass), so the pairs, and with the checkpointed AdamW state the
parameters, of a resumed run equal those of an uninterrupted one. Pairs are anything with
``pair_id``, ``category``, ``source`` / ``target`` (image paths), ``source_points`` /
``target_points`` ([N, 2] x, y) and optional ``source_size`` / ``target_size`` ((W, H)) and
``target_bbox``, e.g. ``evaluation.spair.load_spair``'s. Validation (step 0, every
``validate_every`` steps and at the end) hands each validation pair with its two descriptor maps to
``validator`` (``evaluation.pck.spair_validator``: PCK@0.1 bbox per point), which returns a
fraction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes, check_state_dict, short_hash
from ..features.preprocess import load_image
from ..runs.checkpoints import restore_rng, rng_tensors
from ..runs.loop import ResumableRun
from ..runs.skips import SkipLog
from ..features.store import FeatureStore, image_key
from .aggregator import Aggregator
from .loss import clip_loss, grid_indices
from .picture import mixing_weights_picture

CHECKPOINT_FORMAT = "cleandift_rt_aggregator_checkpoint"
AGGREGATOR_FILE = "aggregator.safetensors"
WEIGHTS_PICTURE = "mixing_weights.png"
RECIPE_VAL_PAIRS = 360
AUTO = "auto"  # cache_dir: OUT/features


@dataclass
class HyperTrainConfig:
    """The recipe (docs/method.md, Diffusion Hyperfeatures): 5000 random pairs, AdamW lr 1e-3, no weight decay, validation
    every 1000 steps on 360 validation pairs (``val_pairs=None``: min(360, steps // 10) and at least
    one, so a smoke run's validation extracts a tenth of the images its training does)."""

    steps: int = 5000
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_pairs: int | None = None
    validate_every: int = 1000
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0

    def check(self) -> HyperTrainConfig:
        for name in ("steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("validate_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off / only at the end), got {getattr(self, name)}")
        if self.val_pairs is not None and self.val_pairs < 0:
            raise ValueError(f"val_pairs must be >= 0 (or None for min(360, steps // 10)), got {self.val_pairs}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0 (finite), got {self.lr} and {self.weight_decay}")
        return self

    @property
    def validation_pairs(self) -> int:
        return min(RECIPE_VAL_PAIRS, max(1, self.steps // 10)) if self.val_pairs is None else self.val_pairs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OBJECTIVE_FIELDS = ("lr", "weight_decay", "seed")  # what a resumed run must share (steps may grow)


@dataclass
class ValItem:
    """A usable pair: its images, their (W, H), the keypoints inside both, the target box."""

    pair_id: str
    category: str
    source: Path
    target: Path
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    source_points: np.ndarray
    target_points: np.ndarray
    target_bbox: tuple[float, ...] | None


class _Broken(Exception):
    def __init__(self, reason: str, where: str):
        super().__init__(reason)
        self.reason, self.where = reason, where


def _inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)


class HyperTrainer(ResumableRun):
    """Build with a fresh :class:`Aggregator`, its stored source (``sources.EngineTaps`` /
    ``InversionTaps``) and pairs; :meth:`run` trains and writes ``OUT/aggregator.safetensors`` (the
    loop, resume and checkpoints are ``runs.loop.ResumableRun``'s).

    ``cache_dir``: ``"auto"`` (``OUT/features``), a folder (shared between runs: cleandift and
    cleandift-heads of one engine share it), or None (recompute every time: ``--cache none``).
    ``resume``: continue from the newest readable checkpoint in ``OUT/checkpoints`` (a run killed
    before its first checkpoint starts over).
    """

    kind = "aggregator"
    checkpoint_format = CHECKPOINT_FORMAT
    objective_fields = OBJECTIVE_FIELDS
    free_fields = ("steps",)  # a resumed run may train longer
    progress_desc = "train-aggregator"
    progress_unit = "pair"
    validation_record = "own"  # {"step", "val_pck"} lines of their own
    validate_first = True  # the untrained network's PCK is the first point of the curve

    def __init__(self, aggregator: Aggregator, stored, pairs: Sequence, out: str | Path,
                 config: HyperTrainConfig | None = None, val_pairs: Sequence = (),
                 validator: Callable[[Iterable], float] | None = None, cache_dir: str | Path | None = AUTO,
                 resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                 device: str | torch.device | None = None):
        self.config = (config or HyperTrainConfig()).check()
        self.open_run(out, resume=resume, keep_checkpoints=self.config.keep_checkpoints, progress=progress, log=log)
        self.aggregator, self.stored, self.pairs = aggregator, stored, list(pairs)
        self.validator = validator
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for, but CUDA is not available here: use --device cpu")
        if not self.pairs:
            raise ValueError("no training pairs")
        self.aggregator.to(self.device).train()
        cache_root = self.out / "features" if cache_dir == AUTO else cache_dir
        self.cache = FeatureStore(cache_root)
        self.optimizer = torch.optim.AdamW(self.aggregator.network.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.skips = SkipLog("pair")
        self._broken: dict[Path, _Broken] = {}
        self.epoch, self.index = 0, 0  # the cursor: pass `epoch`, position `index` in its order
        self.last = {"loss": None, "val_pck": None}  # the latest of each in the metrics (kept over a resume)
        self.val_items = self._validation_items(val_pairs, self.config.validation_pairs)
        if self.config.validation_pairs and validator is not None and not self.val_items:
            self.log("note: no usable validation pairs: validation is off")
        self.resume(resume)  # after the validation pairs: the checkpoint's skip log counts theirs already

    # -- data -----------------------------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        """Pairs left out, by reason."""
        return dict(self.skips.counts)

    def _image_size(self, path: Path, annotated) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        if path in self._broken:
            raise self._broken[path]
        try:
            with Image.open(path) as im:
                size = im.size
        except FileNotFoundError:
            self._broken[path] = _Broken("image file missing", str(path))
            raise self._broken[path] from None
        except (UnidentifiedImageError, OSError):
            self._broken[path] = _Broken("image cannot be decoded", str(path))
            raise self._broken[path] from None
        if annotated is not None and tuple(annotated) != size:
            self._broken[path] = _Broken("image size differs from its annotation", f"{path}: {size} vs {tuple(annotated)}")
            raise self._broken[path]
        return size

    def features(self, path: Path) -> dict[str, torch.Tensor]:
        """The stored arrays of one image (computed and cached on first use) as float32 tensors."""
        if path in self._broken:
            raise self._broken[path]

        def compute():
            try:  # SPair's keypoints refer to the stored pixel layout: no EXIF rotation
                image = load_image(path, exif_orientation=False)
                return self.stored.compute(image)
            except (ValueError, TypeError, OSError) as exc:
                raise _Broken("feature extraction failed", f"{path}: {str(exc).splitlines()[0]}") from None

        try:
            arrays = self.cache.get(self.stored.key, image_key(path), compute)
        except _Broken as exc:
            self._broken[path] = exc
            raise
        return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}

    def _item(self, pair) -> ValItem:
        """The pair with its sizes checked and its keypoints inside both images (raises _Broken)."""
        source, target = Path(pair.source), Path(pair.target)
        source_size = self._image_size(source, getattr(pair, "source_size", None))
        target_size = self._image_size(target, getattr(pair, "target_size", None))
        src = np.asarray(pair.source_points, dtype=np.float64).reshape(-1, 2)
        trg = np.asarray(pair.target_points, dtype=np.float64).reshape(-1, 2)
        keep = _inside(src, source_size) & _inside(trg, target_size) if len(src) == len(trg) else np.zeros(0, bool)
        if not keep.any():
            raise _Broken("no keypoint inside both images", str(pair.pair_id))
        box = getattr(pair, "target_bbox", None)
        return ValItem(str(pair.pair_id), str(pair.category), source, target, source_size, target_size, src[keep],
                       trg[keep], tuple(box) if box is not None else None)

    def _validation_items(self, pairs: Sequence, limit: int) -> list[ValItem]:
        """The first ``limit`` usable pairs of a seeded random order, their features computed now."""
        from tqdm.auto import tqdm

        if not limit or not pairs or self.validator is None:
            return []
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.config.seed + 1)).tolist()
        items: list[ValItem] = []
        bar = tqdm(total=min(limit, len(pairs)), desc="aggregator features (val)", unit="pair", dynamic_ncols=True,
                   disable=not self.progress)
        for index in order:
            if len(items) >= limit:
                break
            try:
                item = self._item(pairs[index])
                self.features(item.source), self.features(item.target)
            except _Broken as exc:
                self.skips.add(f"validation: {exc.reason}", exc.where)
                continue
            items.append(item)
            bar.update(1)
        bar.close()
        return items

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pairs), generator=gen).tolist()

    def _next_pair(self):
        """(item, source features, target features) of the next usable training pair; advances the cursor."""
        order, tried = self._order(self.epoch), 0
        while True:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            pair = self.pairs[order[self.index]]
            self.index += 1
            try:
                item = self._item(pair)
                return item, self.features(item.source), self.features(item.target)
            except _Broken as exc:
                self.skips.add(exc.reason, exc.where)
                tried += 1
                if tried >= len(order):
                    raise ValueError(f"no usable training pair ({self.skips.summary()})") from None

    # -- the objective --------------------------------------------------------------------------

    def _loss(self, item: ValItem, fa: dict, fb: dict) -> torch.Tensor:
        feats = {t: torch.stack([fa[t], fb[t]]).to(self.device) for t in self.aggregator.layers}
        desc = self.aggregator(feats)
        grid = tuple(desc.shape[-2:])
        return clip_loss(desc[0], desc[1], grid_indices(item.source_points, item.source_size, grid),
                         grid_indices(item.target_points, item.target_size, grid))

    def train_step(self) -> dict:
        started = time.perf_counter()
        item, fa, fb = self._next_pair()
        self.aggregator.train()
        loss = self.optimizer_step(self._loss(item, fa, fb))
        self.last["loss"] = loss
        return {"step": self.step, "loss": loss, "pair": item.pair_id, "seconds": time.perf_counter() - started}

    @torch.no_grad()
    def descriptor(self, path: Path) -> torch.Tensor:
        """``[C, h, w]`` descriptors of one image with the network in eval mode."""
        self.aggregator.eval()
        feats = {t: v[None].to(self.device) for t, v in self.features(path).items()}
        return self.aggregator(feats)[0].float().cpu()

    def validate(self) -> float | None:
        """PCK (a fraction) of the current network on the validation pairs, by ``validator``."""
        if not self.val_items or self.validator is None:
            return None
        memo: dict[Path, torch.Tensor] = {}

        def descriptors():
            for item in self.val_items:
                for path in (item.source, item.target):
                    if path not in memo:
                        if len(memo) > 8:  # pairs of one category share images; a few stay in memory
                            memo.pop(next(iter(memo)))
                        memo[path] = self.descriptor(path)
                yield item, memo[item.source], memo[item.target]

        return float(self.validator(descriptors()))

    def validation(self) -> tuple[dict, str] | None:
        val_pck = self.validate()
        if val_pck is None:
            return None
        self.last["val_pck"] = val_pck
        line = f"step {self.step}: val PCK@0.1 bbox {100 * val_pck:.2f}% ({len(self.val_items)} pairs)"
        return {"val_pck": val_pck}, line

    # -- checkpoints (what runs.loop adds: format, step, config, the AdamW moments) ----------------

    def _identity(self) -> dict:
        return {"config": self.aggregator.config.to_dict(), "source": self.aggregator.source,
                "stored": self.stored.key, "pairs": short_hash(*(p.pair_id for p in self.pairs))}

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {**{f"model.{k}": v for k, v in self.aggregator.network.state_dict().items()},
                   **rng_tensors(self.device)}
        metadata = {"epoch": str(self.epoch), "index": str(self.index), "identity": json.dumps(self._identity()),
                    "skipped": json.dumps(self.skips.to_json())}
        return tensors, metadata

    def other_changes(self, meta: dict) -> list[str]:
        theirs, ours = json.loads(meta["identity"]), json.loads(json.dumps(self._identity()))
        return [f"the {k}" for k in ours if theirs.get(k) != ours[k]]

    def load_checkpoint_state(self, path: Path, state: dict, meta: dict) -> None:
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        check_state_dict(self.aggregator.network.state_dict(), model_state, f"aggregation network in {path}")
        self.aggregator.network.load_state_dict(model_state)
        restore_rng(state, self.device)
        self.epoch, self.index = int(meta["epoch"]), int(meta["index"])
        skipped = json.loads(meta["skipped"])
        if isinstance(skipped, list):  # checkpoints before the shared skip log: [counts, {reason: example}]
            skipped = {"counts": skipped[0], "examples": {r: [e] for r, e in skipped[1].items()}}
        self.skips = SkipLog.from_json(skipped, "pair")

    def keep_metric(self, record: dict) -> None:
        """The kept records restore the latest loss and validation PCK."""
        self.last.update({k: record[k] for k in self.last if k in record})

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        self.run_steps(c.steps, c.validate_every, c.checkpoint_every)
        path = self.save_aggregator(self.last["val_pck"])
        self.log(f"done: {self.step} steps ({self.skips.summary()}); features computed {self.cache.computed}, reused "
                 f"{self.cache.reused}; wrote {path} and {self.out / WEIGHTS_PICTURE}")
        return {"steps": self.step, "final_loss": self.last["loss"], "val_pck": self.last["val_pck"],
                "skipped": self.skipped, "file": str(path)}

    def save_aggregator(self, val_pck: float | None = None) -> Path:
        """``OUT/aggregator.safetensors`` and the mixing-weights picture beside it."""
        self.aggregator.eval()
        path = self.aggregator.save(self.out / AGGREGATOR_FILE, steps=self.step, train=self.config.to_dict(),
                                    **({"val_pck": val_pck} if val_pck is not None else {}))
        picture = mixing_weights_picture(self.aggregator.mixing_weights(), self.aggregator.layers,
                                         self.aggregator.timesteps,
                                         f"{self.aggregator.source}: mixing weights after {self.step} steps")
        atomic_write_bytes(self.out / WEIGHTS_PICTURE, lambda tmp: picture.save(tmp, format="PNG"))
        return path
