"""GATE's plain data: one technique combination (:class:`GateRecipe`) and a bucket of them (:class:`Bucket`).

A bucket is a JSON file (schema and the paper's correspondence bucket in docs/gate.md)::

    {"format": "cleandift-gate-bucket", "version": 1,
     "size": 512,                                   # optional: model input size (default: the base's)
     "controlnets": {"canny": "control_sd15_canny/"},              # name -> diffusers ControlNetModel folder
     "loras": {"style_a": "loras/a.safetensors", "merged": "unet_dir/"},  # name -> LoRA file or merged U-Net folder
     "conv": [{"prompt": "...", "seed": 0}, {"lora": "style_a", "prompt": "a photo"}, ...],
     "attention": {"prompt": "...", "controlnet": "canny", "t_start": 60}}          # optional

Paths are relative to the bucket file. Every recipe field is optional (defaults below).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

BUCKET_FORMAT = "cleandift-gate-bucket"
BUCKET_VERSION = 1
NUM_TRAIN_TIMESTEPS = 1000

# The paper's fine-grained SPair prompt (appendix C.2.1): all categories plus quality words.
SPAIR_CATEGORIES = ("aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, dog, horse, motorbike, person, "
                    "potted plant, sheep, train, tv monitor")
QUALITY_WORDS = "high quality, best quality, highly realistic, masterpiece, high resolution"
SPAIR_PROMPT = f"a photo of {SPAIR_CATEGORIES}, {QUALITY_WORDS}"


@dataclass(frozen=True)
class GateRecipe:
    """One technique combination: how one feature of a bucket is extracted.

    ``prompt``: text, ``{category}`` filled in per image ("" = the empty prompt); ``controlnet`` /
    ``lora``: names in the extractor's (bucket's) tables, with their scales; ``t``: the timestep the
    features come from; ``t_start``: when set, multi-step denoising (noise at ``t_start``, one
    scheduler step per timestep down to ``t``; noisy baseline only); ``seed``: posterior sample and
    noise. A CleanDIFT student ignores ``t`` and ``seed`` (clean latent at its own timestep).
    """

    prompt: str = ""
    controlnet: str | None = None
    controlnet_scale: float = 1.0
    lora: str | None = None
    lora_scale: float = 1.0
    t: int = 50
    t_start: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise TypeError(f"recipe prompt must be a string, got {type(self.prompt).__name__}")
        self.prompt_for("category")  # a stray brace fails here, not at the first image
        for name in ("controlnet", "lora"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"recipe {name} must be a name from the bucket's {name}s table, got {value!r}")
        for name in ("controlnet_scale", "lora_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"recipe {name} must be a finite number, got {value!r}")
        for name in ("t", "seed") + (("t_start",) if self.t_start is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"recipe {name} must be a whole number, got {value!r}")
        if not 0 <= self.t < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"recipe t={self.t} outside [0, {NUM_TRAIN_TIMESTEPS - 1}]")
        if self.t_start is not None and not self.t < self.t_start < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"recipe t_start={self.t_start} must lie above t={self.t} and below "
                             f"{NUM_TRAIN_TIMESTEPS} (multi-step denoising goes from t_start down to t)")
        if self.seed < 0:
            raise ValueError(f"recipe seed must be >= 0, got {self.seed}")

    def prompt_for(self, category: str) -> str:
        """The prompt with ``{category}`` filled in."""
        try:
            return self.prompt.format(category=category)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt {self.prompt!r}: only {{category}} may appear in braces (double other braces: "
                             f"{{{{ }}}}); {type(exc).__name__}: {exc}") from None

    @property
    def unet_calls(self) -> int:
        """U-Net forwards per image: one, or one per timestep from ``t_start`` down to ``t``."""
        return 1 if self.t_start is None else self.t_start - self.t + 1

    def to_dict(self) -> dict:
        """Only the fields that differ from the defaults (what a person writes in a bucket)."""
        default = GateRecipe()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "GateRecipe":
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object of recipe fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a recipe has {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def describe(self) -> str:
        parts = [f"prompt={self.prompt!r}" if self.prompt else "prompt=''"]
        if self.controlnet:
            parts.append(f"controlnet={self.controlnet}@{self.controlnet_scale:g}")
        if self.lora:
            parts.append(f"lora={self.lora}@{self.lora_scale:g}")
        parts.append(f"t={self.t}" if self.t_start is None else f"t={self.t_start}->{self.t}")
        parts.append(f"seed={self.seed}")
        return " ".join(parts)


@dataclass
class Bucket:
    """The features GATE amalgamates: ``conv`` recipes (one convolutional feature each), an optional
    ``attention`` recipe, and the named model files the recipes refer to (absolute paths)."""

    conv: list[GateRecipe]
    attention: GateRecipe | None = None
    controlnets: dict[str, str] = field(default_factory=dict)
    loras: dict[str, str] = field(default_factory=dict)
    size: int | None = None

    def __post_init__(self):
        if not self.conv:
            raise ValueError("a bucket needs at least one conv recipe (the features to amalgamate)")
        recipes = [(f"conv[{i}]", r) for i, r in enumerate(self.conv)]
        if self.attention is not None:
            recipes.append(("attention", self.attention))
        for where, r in recipes:
            if r.controlnet is not None and r.controlnet not in self.controlnets:
                raise ValueError(f"bucket {where} uses ControlNet {r.controlnet!r}, which the bucket's controlnets "
                                 f"table does not name (it has {sorted(self.controlnets) or 'none'})")
            if r.lora is not None and r.lora not in self.loras:
                raise ValueError(f"bucket {where} uses LoRA {r.lora!r}, which the bucket's loras table does not name "
                                 f"(it has {sorted(self.loras) or 'none'})")
        seen: dict[GateRecipe, int] = {}
        for i, r in enumerate(self.conv):
            if r in seen:
                raise ValueError(f"bucket conv[{i}] repeats conv[{seen[r]}] exactly (same techniques and seed): "
                                 "give it another seed or drop it")
            seen[r] = i
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0
                                      or self.size % 64):
            raise ValueError(f"bucket size must be a positive multiple of 64, got {self.size!r}")

    @property
    def used_controlnets(self) -> list[str]:
        return sorted({r.controlnet for r in self.recipes() if r.controlnet})

    @property
    def used_loras(self) -> list[str]:
        return sorted({r.lora for r in self.recipes() if r.lora})

    def recipes(self) -> list[GateRecipe]:
        return self.conv + ([self.attention] if self.attention is not None else [])

    def to_dict(self) -> dict:
        out = {"format": BUCKET_FORMAT, "version": BUCKET_VERSION}
        if self.size is not None:
            out["size"] = self.size
        out["controlnets"] = dict(self.controlnets)
        out["loras"] = dict(self.loras)
        out["conv"] = [r.to_dict() for r in self.conv]
        if self.attention is not None:
            out["attention"] = self.attention.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict, root: str | Path = ".", where: str = "bucket") -> "Bucket":
        """Parse a bucket document; relative model paths are taken from ``root`` and must exist."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object (see docs/gate.md), got {type(data).__name__}")
        if data.get("format") != BUCKET_FORMAT:
            raise ValueError(f"{where}: 'format' must be {BUCKET_FORMAT!r} (see docs/gate.md), got {data.get('format')!r}")
        if data.get("version") != BUCKET_VERSION:
            raise ValueError(f"{where}: version {data.get('version')!r} is not supported (this release reads "
                             f"version {BUCKET_VERSION})")
        known = {"format", "version", "size", "controlnets", "loras", "conv", "attention"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a bucket has {', '.join(sorted(known))}")
        conv = data.get("conv")
        if not isinstance(conv, list):
            raise ValueError(f"{where}: 'conv' must be a list of recipes")
        tables = {}
        for table in ("controlnets", "loras"):
            entries = data.get(table, {})
            if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
                raise ValueError(f"{where}: {table!r} must map names to paths (strings)")
            tables[table] = {name: str(_existing(Path(root), value, f"{where} {table}.{name}"))
                             for name, value in entries.items()}
        attention = data.get("attention")
        return cls(conv=[GateRecipe.from_dict(r, f"{where} conv[{i}]") for i, r in enumerate(conv)],
                   attention=None if attention is None else GateRecipe.from_dict(attention, f"{where} attention"),
                   size=data.get("size"), **tables)

    @classmethod
    def load(cls, path: str | Path) -> "Bucket":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bucket file {path} does not exist (a JSON file, schema in docs/gate.md)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, root=path.parent, where=str(path))


def _existing(root: Path, value: str, where: str) -> Path:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise FileNotFoundError(f"{where}: {path} does not exist (paths are relative to the bucket file)")
    return path.resolve()
