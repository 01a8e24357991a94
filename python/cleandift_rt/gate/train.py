"""Training GATE's amalgamation on keypoint pairs: features cached once, checkpoints, exact resume.

Output folder::

    OUT/features/<bucket key>/*.safetensors   each image's bucket features, fp16 (store.BucketStore)
    OUT/checkpoints/step-0000100.safetensors  model, AdamW moments, RNG, step (atomic; last K kept)
    OUT/metrics.jsonl                         one JSON object per step (loss, clip, sparsity; val_loss when validated)
    OUT/gate.safetensors                      the trained amalgamator + bucket, size and models in its metadata

Pairs are anything with ``pair_id``, ``category``, ``source`` / ``target`` (image paths),
``source_points`` / ``target_points`` ([N, 2] x, y pixels) and optional ``source_size`` /
``target_size`` ((W, H) annotations), e.g. ``evaluation.spair.load_spair``'s. The pair order of
epoch e is a seeded permutation that depends only on (seed, e); dropout draws from torch's global
generator, whose state is checkpointed: a resumed run computes the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..checkpoint import check_state_dict, write_safetensors
from ..features.preprocess import load_image
from ..runs.checkpoints import restore_rng, rng_tensors
from ..runs.loop import ResumableRun
from ..runs.skips import SkipLog
from .amalgam import Amalgamator, clip_loss, grid_indices, sparsity_term
from .extract import GateExtractor
from .recipe import Bucket
from .store import BucketStore, bytes_per_image

CHECKPOINT_FORMAT = "cleandift_gate_checkpoint"
GATE_FORMAT = "cleandift_gate"
GATE_FILE = "gate.safetensors"


@dataclass
class GateTrainConfig:
    """Defaults: a CPU smoke run (4 pairs, 256 px, 2 epochs). ``PRESETS["paper"]``: docs/method.md, GATE."""

    epochs: int = 2
    pairs_per_epoch: int | None = None  # None: the whole pool every epoch (the paper: 5000 random pairs)
    max_pairs: int | None = 4  # the pool: the first N usable pairs (None: all)
    size: int | None = 256  # model input side; None: the bucket's, else the base model's resolution
    lr: float = 5e-4
    weight_decay: float = 0.01
    sparsity: float = 1e-3  # weight of the sparsity term (the authors tune it; their code adapts it near 0)
    output_conv: bool = True
    dropout: float = 0.5
    val_pairs: int = 0  # held-out pairs whose mean loss is logged (0: no validation)
    validate_every: int = 0
    checkpoint_every: int = 4  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    preset: str | None = "smoke"

    def check(self) -> "GateTrainConfig":
        for name in ("epochs", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pairs_per_epoch", "max_pairs", "size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        for name in ("lr", "weight_decay", "sparsity", "dropout", "val_pairs", "validate_every", "checkpoint_every"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr == 0 or self.dropout >= 1:
            raise ValueError("lr must be > 0 and dropout below 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "smoke": {},
    "paper": dict(epochs=2, pairs_per_epoch=5000, max_pairs=None, size=None, val_pairs=360, validate_every=500,
                  checkpoint_every=500),
}
# What a resumed run must share with the original (the rest may change, e.g. more epochs).
OBJECTIVE_FIELDS = ("pairs_per_epoch", "max_pairs", "size", "lr", "weight_decay", "sparsity", "output_conv", "dropout",
                    "seed")


class _Broken(Exception):
    """An image a pair cannot use: ``reason`` is what the summary counts, ``where`` an example."""

    def __init__(self, reason: str, where: str):
        super().__init__(reason)
        self.reason, self.where = reason, where


@dataclass
class _Usable:
    """A pair whose images were read and extracted, with its keypoints on the feature grid."""

    pair_id: str
    source: tuple[Path, str]
    target: tuple[Path, str]
    source_index: torch.Tensor
    target_index: torch.Tensor


class GateTrainer(ResumableRun):
    """Build with an extractor, a bucket and pairs; :meth:`run` trains and writes ``OUT/gate.safetensors``
    (the loop, resume and checkpoints are ``runs.loop.ResumableRun``'s).

    Building extracts (or finds in the cache) the features of the first ``max_pairs`` usable pairs;
    ``features_dir`` shares one feature cache between runs (default ``OUT/features``).
    """

    kind = "GATE"
    checkpoint_format = CHECKPOINT_FORMAT
    objective_fields = OBJECTIVE_FIELDS
    free_fields = ("epochs",)  # a resumed run may train longer
    progress_desc = "train-gate"
    progress_unit = "pair"

    def __init__(self, extractor: GateExtractor, bucket: Bucket, pairs: Sequence, out: str | Path,
                 config: GateTrainConfig | None = None, val_pairs: Sequence = (), resume: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print, features_dir: str | Path | None = None):
        self.config = (config or GateTrainConfig()).check()
        if self.config.size is not None and extractor.size != (self.config.size, self.config.size):
            raise ValueError(f"config size {self.config.size} differs from the extractor's {extractor.size}: build the "
                             "extractor with size=config.size")
        self.extractor, self.bucket = extractor, bucket
        self.open_run(out, resume=resume, keep_checkpoints=self.config.keep_checkpoints, progress=progress, log=log)
        self.store = BucketStore(features_dir if features_dir is not None else self.out / "features", bucket, extractor)
        self.skips = SkipLog("pair")
        self._broken: dict[Path, _Broken] = {}
        torch.manual_seed(self.config.seed)  # the model's initial weights
        self.model = Amalgamator(extractor.conv_channels, extractor.attention_channels if bucket.attention else 0,
                                 len(bucket.conv), self.config.output_conv, self.config.dropout).to(extractor.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        per_image = bytes_per_image(bucket, extractor.unet.config.block_out_channels, extractor.size,
                                    extractor.attention_channels // 2)
        self.log(f"bucket: {len(bucket.conv)} conv feature(s){' + attention' if bucket.attention else ''} at "
                 f"{extractor.size[0]}x{extractor.size[1]} px; fp16 cache {per_image / 1e6:.2f} MB per image")
        self.pool = self._usable_pairs(pairs, self.config.max_pairs, "train")
        if not self.pool:
            raise ValueError(f"no usable training pairs ({self.skips.summary()})")
        self.val_pool = self._usable_pairs(val_pairs, self.config.val_pairs, "val", shuffle=True) \
            if self.config.val_pairs else []
        self.per_epoch = min(self.config.pairs_per_epoch or len(self.pool), len(self.pool))
        self.total_steps = self.config.epochs * self.per_epoch
        self.resume(resume)

    # -- data -----------------------------------------------------------------------------------

    @property
    def skipped(self) -> dict[str, int]:
        """Pairs left out, by reason."""
        return dict(self.skips.counts)

    def _image(self, path: Path, annotated, category: str) -> tuple[int, int]:
        """Size of the image, its features extracted into the store first (raises _Broken with the reason)."""
        if path in self._broken:
            raise self._broken[path]
        try:
            image = load_image(path, exif_orientation=False)  # keypoints refer to the stored pixel layout
        except FileNotFoundError:
            self._broken[path] = _Broken("image file missing", str(path))
        except ValueError as exc:
            self._broken[path] = _Broken("image cannot be decoded", str(exc))
        else:
            if annotated is None or tuple(annotated) == image.size:
                if not self.store.has(path, category):
                    self.store.extract(path, image, category)
                return image.size
            self._broken[path] = _Broken("image size differs from its annotation",
                                         f"{path}: {image.size} vs {tuple(annotated)}")
        raise self._broken[path]

    def _usable_pairs(self, pairs: Sequence, limit: int | None, what: str, shuffle: bool = False) -> list[_Usable]:
        """The first ``limit`` pairs (in a seeded random order with ``shuffle``) whose images are usable."""
        from tqdm.auto import tqdm

        order = range(len(pairs))
        if shuffle:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        usable: list[_Usable] = []
        bar = tqdm(total=min(limit or len(pairs), len(pairs)), desc=f"GATE features ({what})", unit="pair",
                   disable=not self.progress, dynamic_ncols=True)
        for index in order:
            if limit is not None and len(usable) >= limit:
                break
            pair = pairs[index]
            try:
                src_size = self._image(Path(pair.source), getattr(pair, "source_size", None), pair.category)
                trg_size = self._image(Path(pair.target), getattr(pair, "target_size", None), pair.category)
            except _Broken as exc:
                self.skips.add(exc.reason, exc.where)
                continue
            src, trg = np.asarray(pair.source_points, float), np.asarray(pair.target_points, float)
            keep = _inside(src, src_size) & _inside(trg, trg_size)
            if not keep.any():
                self.skips.add("no keypoint inside both images", pair.pair_id)
                continue
            grid, device = self.extractor.grid, self.extractor.device
            usable.append(_Usable(str(pair.pair_id), (Path(pair.source), pair.category), (Path(pair.target), pair.category),
                                  grid_indices(torch.from_numpy(src[keep]), src_size, grid).to(device),
                                  grid_indices(torch.from_numpy(trg[keep]), trg_size, grid).to(device)))
            bar.update(1)
        bar.close()
        return usable

    def _features(self, pair: _Usable):
        (sc, sa), (tc, ta) = self.store.load(*pair.source), self.store.load(*pair.target)
        device = self.extractor.device
        conv = torch.stack([sc, tc]).to(device)
        attention = torch.stack([sa, ta]).to(device) if sa is not None else None
        return conv, attention

    # -- the objective --------------------------------------------------------------------------

    def _losses(self, pair: _Usable) -> tuple[torch.Tensor, torch.Tensor]:
        descriptors, weights = self.model(*self._features(pair))
        return clip_loss(descriptors[0], descriptors[1], pair.source_index, pair.target_index), sparsity_term(weights)

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.pool), generator=gen)[: self.per_epoch].tolist()

    def train_step(self) -> dict:
        started = time.perf_counter()
        epoch, index = divmod(self.step, self.per_epoch)
        pair = self.pool[self._order(epoch)[index]]
        self.model.train()
        clip, sparsity = self._losses(pair)
        loss = self.optimizer_step(clip + self.config.sparsity * sparsity)
        return {"step": self.step, "epoch": epoch, "pair": pair.pair_id, "loss": loss, "clip": clip.item(),
                "sparsity": sparsity.item(), "seconds": time.perf_counter() - started}

    @torch.no_grad()
    def mean_loss(self, pairs: Sequence[_Usable] | None = None) -> float:
        """The CLIP loss averaged over ``pairs`` (default: the training pool) with the model in eval mode."""
        self.model.eval()
        pairs = self.pool if pairs is None else pairs
        return float(np.mean([float(self._losses(p)[0]) for p in pairs]))

    def validation(self) -> tuple[dict, str] | None:
        if not self.val_pool:
            return None
        loss = self.mean_loss(self.val_pool)
        return {"val_loss": loss}, f"step {self.step}: validation loss {loss:.4f}"

    # -- checkpoints (what runs.loop adds: format, step, config, the AdamW moments) ----------------

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                   **rng_tensors(self.extractor.device)}
        metadata = {"bucket": json.dumps(self.bucket.to_dict()), "pool": json.dumps([p.pair_id for p in self.pool])}
        return tensors, metadata

    def other_changes(self, meta: dict) -> list[str]:
        changed = []
        if json.loads(meta["bucket"]) != self.bucket.to_dict():
            changed.append("the bucket")
        if json.loads(meta["pool"]) != [p.pair_id for p in self.pool]:
            changed.append("the training pairs")
        return changed

    def load_checkpoint_state(self, path: Path, state: dict, meta: dict) -> None:
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        check_state_dict(self.model.state_dict(), model_state, f"amalgamator in {path}")
        self.model.load_state_dict(model_state)
        restore_rng(state, self.extractor.device)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        record = self.run_steps(self.total_steps, c.validate_every, c.checkpoint_every)
        path = self.save_gate()
        self.log(f"done: {self.step} steps over {len(self.pool)} pairs ({self.skips.summary()}); wrote {path}")
        return {"steps": self.step, "pairs": len(self.pool), "final_loss": record["loss"] if record else None,
                "skipped": self.skipped, "file": str(path)}

    def save_gate(self) -> Path:
        """The trained amalgamator with everything needed to extract its features again (eval-spair --gate)."""
        e = self.extractor
        student = e.student.source if e.student is not None else ""
        metadata = {"format": GATE_FORMAT, "bucket": json.dumps(self.bucket.to_dict()), "size": json.dumps(e.size),
                    "conv_channels": str(e.conv_channels), "attention_channels": str(self.model.attention_channels),
                    "features": str(len(self.bucket.conv)), "output_conv": json.dumps(self.config.output_conv),
                    "base": e.base.source, "student": student, "steps": str(self.step)}
        path = self.out / GATE_FILE
        write_safetensors(path, self.model.state_dict(), metadata)
        return path


def _inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    return (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
