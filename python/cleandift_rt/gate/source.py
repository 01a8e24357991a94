"""GATE feature sources for ``evaluation.runner.evaluate``: a trained amalgamation, or one recipe alone.

``GateFeatures.from_dir(DIR)`` reads ``DIR/gate.safetensors`` (written by ``train-gate``): the
amalgamator's weights and, in the metadata, the bucket, size, base model and student it was
trained with. ``features(image, category)`` runs every recipe of the bucket on the image and
returns the amalgamated descriptor ``[C + A, gh, gw]`` (float32, CPU), which ``evaluate``
upsamples and matches like any other source. :class:`RecipeFeatures` is one recipe's feature
without amalgamation: ``GateRecipe()`` conv features are the paper's baseline row (one feature, no
technique: 61.15 PCK@0.1 img with SD 1.5). Both are ``features.source.DescriptorSource`` adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_state_dict, file_identity, read_safetensors, read_safetensors_metadata, short_hash
from ..features.source import DescriptorSource
from ..features.store import round_trip
from ..models import BaseModel, load_base, load_student
from .amalgam import Amalgamator
from .extract import GateExtractor, attention_feature, conv_feature
from .recipe import Bucket, GateRecipe
from .store import CACHE_DTYPE
from .train import GATE_FILE, GATE_FORMAT


def load_gate(path: str | Path) -> tuple[Amalgamator, dict]:
    """The amalgamator of a ``gate.safetensors`` file (or a folder holding one), in eval mode, and its metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / GATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the --out folder of cleandift-rt train-gate")
    meta = read_safetensors_metadata(path)
    if meta.get("format") != GATE_FORMAT:
        raise ValueError(f"{path} is not a trained GATE file (format {meta.get('format')!r}); train one with "
                         "cleandift-rt train-gate")
    model = Amalgamator(int(meta["conv_channels"]), int(meta["attention_channels"]), int(meta["features"]),
                        json.loads(meta["output_conv"]))
    state = read_safetensors(path)
    check_state_dict(model.state_dict(), state, str(path))
    model.load_state_dict(state)
    meta = dict(meta, path=str(path))
    return model.eval(), meta


class GateFeatures(DescriptorSource):
    """GATE descriptors of one image: the bucket's recipes, then the trained amalgamation."""

    def __init__(self, extractor: GateExtractor, bucket: Bucket, model: Amalgamator, key: str, name: str = "gate"):
        if model.features != len(bucket.conv) or model.conv_channels != extractor.conv_channels:
            raise ValueError(f"the amalgamator expects {model.features} conv features of {model.conv_channels} "
                             f"channels; this bucket and base give {len(bucket.conv)} of {extractor.conv_channels}")
        self.extractor, self.bucket, self.name = extractor, bucket, name
        self.model = model.to(extractor.device).eval()
        self.key = short_hash(name, key)

    @classmethod
    def from_dir(cls, gate: str | Path, base: str | Path | BaseModel | None = None, student: str | Path | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32) -> "GateFeatures":
        """Rebuild the trained setup; ``base`` / ``student`` default to the paths the file records."""
        model, meta = load_gate(gate)
        bucket = Bucket.from_dict(json.loads(meta["bucket"]), where=f"{meta['path']} bucket")
        base_path = base if base is not None else meta["base"]
        if not isinstance(base_path, BaseModel) and not Path(base_path).exists():
            raise FileNotFoundError(f"base model {base_path} (recorded in {meta['path']}) does not exist: pass --base DIR")
        base_model = base_path if isinstance(base_path, BaseModel) else load_base(base_path)
        student_path = student if student is not None else (meta.get("student") or None)
        student_model = load_student(student_path, base_model) if student_path else None
        extractor = GateExtractor.for_bucket(bucket, base_model, student=student_model, size=tuple(json.loads(meta["size"])),
                                             device=device, dtype=dtype)
        key = short_hash(file_identity(meta["path"]), file_identity(base_model.source),
                         file_identity(student_path) if student_path else "")
        return cls(extractor, bucket, model, key)

    @torch.no_grad()
    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        e, grid = self.extractor, self.extractor.grid

        def as_trained(parts: dict) -> dict:  # training read the store: the model sees its rounding here too
            return {k: torch.from_numpy(v).float() for k, v in round_trip(parts, CACHE_DTYPE).items()}

        conv = torch.stack([conv_feature(as_trained(e.extract(image, r, category, conv=True)), grid)
                            for r in self.bucket.conv])
        attention = None
        if self.bucket.attention is not None:
            parts = as_trained(e.extract(image, self.bucket.attention, category, conv=False, attention=True))
            attention = attention_feature(parts, grid)[None].to(e.device)
        descriptor, _ = self.model(conv[None].to(e.device), attention)
        return {self.name: descriptor[0].float().cpu().numpy()}

    def describe(self) -> dict:
        e = self.extractor
        return {"method": self.name, "bucket": self.bucket.to_dict(), "size": list(e.size), "grid": list(e.grid),
                "base": e.base.source, "student": e.student.source if e.student is not None else None}


class RecipeFeatures(DescriptorSource):
    """One recipe's ``[C, gh, gw]`` feature (``kind`` "conv" or "attention"), no amalgamation."""

    def __init__(self, extractor: GateExtractor, recipe: GateRecipe, kind: str = "conv", name: str = "gate-recipe"):
        if kind not in ("conv", "attention"):
            raise ValueError(f"feature kind must be 'conv' or 'attention', got {kind!r}")
        extractor.check(recipe)
        self.extractor, self.recipe, self.kind, self.name = extractor, recipe, kind, name
        e = extractor
        self.key = short_hash(name, file_identity(e.base.source), e.student.source if e.student is not None else "",
                              json.dumps(recipe.to_dict(), sort_keys=True), kind, e.size,
                              *(file_identity(p) for p in _model_files(e, recipe)))

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        feature = self.extractor.features(image, self.recipe, category, kind=self.kind)
        return {self.kind: feature.detach().cpu().numpy()}

    def describe(self) -> dict:
        return {"method": self.name, "recipe": self.recipe.to_dict(), "kind": self.kind,
                "size": list(self.extractor.size), "base": self.extractor.base.source}


def _model_files(extractor: GateExtractor, recipe: GateRecipe) -> list[str]:
    """The files behind a recipe's ControlNet and LoRA (their identities key the evaluation cache)."""
    return [extractor.files[(kind, name)] for kind, name in (("controlnet", recipe.controlnet), ("lora", recipe.lora))
            if name is not None]
