"""A bucket's features per image, cached on disk in fp16 at their native resolutions.

``ROOT/<bucket key>/<image key>.safetensors`` holds, for each conv recipe k, ``conv{k}.us3`` ..
``conv{k}.up_blocks.3`` and, with an attention recipe, ``attention.up_blocks.{1,2}``. The maps are
stored as the U-Net produced them and nearest-resized to the common grid when read: nearest
resizing only repeats values, so this equals storing the grid maps, at 2.6x less disk for SD 1.5
(``bytes_per_image``; docs/gate.md has the numbers). The bucket key covers the base model, the
student, every model file of the bucket, the recipes and the size: change any and the features
are extracted again. The files are entries of the one ``features.store.FeatureStore`` (atomic writes,
memory-mapped reads, a file cut short extracted again) under its fp16 policy: an image whose maps
exceed float16's range (65504) is stored in float32, so an odd activation neither stops training nor
turns into inf.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import file_identity, short_hash
from ..features.store import FeatureStore, image_key
from ..taps import tap_shape
from .extract import (ATTENTION_BLOCKS, ATTENTION_PARTS, CONV_PARTS, CONV_TAPS, GRID_TAP, GateExtractor, attention_feature,
                      attention_tap, conv_feature)
from .recipe import Bucket

CACHE_DTYPE = "float16"  # the store's fp16 policy; GateFeatures rounds its maps the same way
_FP16_BYTES = 2


def bucket_key(bucket: Bucket, extractor: GateExtractor) -> str:
    models = {name: file_identity(path) for table in (bucket.controlnets, bucket.loras) for name, path in table.items()
              if name in bucket.used_controlnets + bucket.used_loras}
    student = file_identity(extractor.student.source) if extractor.student is not None and extractor.student.source \
        else ("student" if extractor.student is not None else "")
    recipes = {"conv": [r.to_dict() for r in bucket.conv],
               "attention": bucket.attention.to_dict() if bucket.attention else None}
    return short_hash(file_identity(extractor.base.source), student, json.dumps(models, sort_keys=True),
                      json.dumps(recipes, sort_keys=True), extractor.size, extractor.dtype)


def bytes_per_image(bucket: Bucket, block_out_channels, size: tuple[int, int], tokens: int = 77) -> int:
    """Disk one image's cached bucket costs (fp16 payload; the safetensors header adds about 2 kB)."""
    def pixels(tap: str) -> int:
        _, h, w = tap_shape(tap, block_out_channels, *size)
        return h * w

    conv = sum(tap_shape(t, block_out_channels, *size)[0] * pixels(t) for t in CONV_TAPS)
    conv += int(block_out_channels[0]) * pixels(GRID_TAP)  # up_blocks.3 runs at us9's resolution
    attention = tokens * sum(pixels(attention_tap(b)) for b in ATTENTION_BLOCKS) if bucket.attention else 0
    return _FP16_BYTES * (len(bucket.conv) * conv + attention)


class BucketStore:
    """Extract-once, read-many features of one bucket (see the module docstring)."""

    def __init__(self, root: str | Path, bucket: Bucket, extractor: GateExtractor):
        self.bucket, self.extractor = bucket, extractor
        self.key = bucket_key(bucket, extractor)
        self.store = FeatureStore(root, CACHE_DTYPE)
        self.dir = self.store.root / self.key

    def path(self, image_path: Path, category: str) -> Path:
        return self.store.path(self.key, image_key(image_path, category))

    def has(self, image_path: Path, category: str) -> bool:
        return self.store.has(self.key, image_key(image_path, category))

    def extract(self, image_path: Path, image, category: str) -> Path:
        """Run every recipe of the bucket on ``image`` and store the maps (unless they are stored already)."""
        self.store.get(self.key, image_key(image_path, category), lambda: self._maps(image, category),
                       metadata={"image": str(image_path), "category": category})
        return self.path(image_path, category)

    def _maps(self, image, category: str) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for k, recipe in enumerate(self.bucket.conv):
            for part, value in self.extractor.extract(image, recipe, category, conv=True).items():
                tensors[f"conv{k}.{part}"] = value
        if self.bucket.attention is not None:
            tensors.update(self.extractor.extract(image, self.bucket.attention, category, conv=False, attention=True))
        return tensors

    def load(self, image_path: Path, category: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(conv [K, C, gh, gw], attention [A, gh, gw] or None)`` in float32 on the common grid."""
        stored = self.store.load(self.key, image_key(image_path, category))
        if stored is None:
            raise FileNotFoundError(f"the features of {image_path} ({category}) are not in {self.dir}: extract them "
                                    "first (BucketStore.extract)")
        parts = {name: torch.from_numpy(value) for name, value in stored.items()}
        grid = self.extractor.grid
        conv = torch.stack([conv_feature({p: parts[f"conv{k}.{p}"] for p in CONV_PARTS}, grid)
                            for k in range(len(self.bucket.conv))])
        attention = None
        if self.bucket.attention is not None:
            attention = attention_feature({p: parts[p] for p in ATTENTION_PARTS}, grid)
        return conv, attention
