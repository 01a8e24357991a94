"""A bucket's features per image, cached on disk in fp16 at their native resolutions.

``ROOT/<bucket key>/<image key>.safetensors`` holds, for each conv recipe k, ``conv{k}.us3`` ..
``conv{k}.up_blocks.3`` and, with an attention recipe, ``attention.up_blocks.{1,2}``. The maps are
stored as the U-Net produced them and nearest-resized to the common grid when read: nearest
resizing only repeats values, so this equals storing the grid maps, at 2.6x less disk for SD 1.5
(``bytes_per_image``; docs/gate.md has the numbers). The bucket key covers the base model, the
student, every model file of the bucket, the recipes and the size: change any and the features
are extracted again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import file_identity, read_safetensors, short_hash, write_safetensors
from ..taps import tap_shape
from .extract import (ATTENTION_BLOCKS, ATTENTION_PARTS, CONV_PARTS, CONV_TAPS, GRID_TAP, GateExtractor, attention_feature,
                      attention_tap, conv_feature)
from .recipe import Bucket

CACHE_DTYPE = torch.float16
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


class FeatureStore:
    """Extract-once, read-many features of one bucket (see the module docstring)."""

    def __init__(self, root: str | Path, bucket: Bucket, extractor: GateExtractor):
        self.bucket, self.extractor = bucket, extractor
        self.dir = Path(root) / bucket_key(bucket, extractor)

    def path(self, image_path: Path, category: str) -> Path:
        return self.dir / f"{short_hash(file_identity(image_path), category)}.safetensors"

    def has(self, image_path: Path, category: str) -> bool:
        return self.path(image_path, category).is_file()

    def extract(self, image_path: Path, image, category: str) -> Path:
        """Run every recipe of the bucket on ``image`` and write its cache file atomically."""
        tensors: dict[str, torch.Tensor] = {}
        for k, recipe in enumerate(self.bucket.conv):
            for part, value in self.extractor.extract(image, recipe, category, conv=True).items():
                tensors[f"conv{k}.{part}"] = value
        if self.bucket.attention is not None:
            for part, value in self.extractor.extract(image, self.bucket.attention, category, conv=False,
                                                      attention=True).items():
                tensors[part] = value
        tensors = {k: v.to(CACHE_DTYPE) for k, v in tensors.items()}
        overflow = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if overflow:
            raise ValueError(f"{image_path}: features {overflow} overflow fp16 (values beyond 65504): this model's "
                             "activations do not fit the fp16 cache")
        path = self.path(image_path, category)
        write_safetensors(path, tensors, metadata={"image": str(image_path), "category": category})
        return path

    def load(self, image_path: Path, category: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(conv [K, C, gh, gw], attention [A, gh, gw] or None)`` in float32 on the common grid."""
        parts = read_safetensors(self.path(image_path, category))
        grid = self.extractor.grid
        conv = torch.stack([conv_feature({p: parts[f"conv{k}.{p}"] for p in CONV_PARTS}, grid)
                            for k in range(len(self.bucket.conv))])
        attention = None
        if self.bucket.attention is not None:
            attention = attention_feature({p: parts[p] for p in ATTENTION_PARTS}, grid)
        return conv, attention
