"""Training configuration as plain data, with the paper's defaults and the release's values as presets.

Precedence when the CLI builds a config: defaults < preset < ``--config`` JSON file < explicit flags
< ``key=value`` overrides. Every value is JSON-serialisable; the whole config is stored in each
checkpoint so ``--resume`` can refuse a run whose objective would silently change.

Older configs and checkpoints carry the boolean ``captions``; it reads as ``text_conditioning``
(true: "captions", false: "none"), so their runs resume.

Every field is checked by its kind (``checks``: integers are never booleans or truncated floats,
numbers are finite, sizes and ranks are bounded), with the field and where its value came from (the
config file, the overrides, a preset) named in the error, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..checks import check_float, check_int, check_size, loads_json, read_json_file
from ..conditioning import (DEFAULT_HEAD_CONDITIONING, DEFAULT_TEXT_CONDITIONING, check_head_conditioning,
                            check_text_conditioning, text_conditioning_from_captions)
from ..models import DEFAULT_STUDENT_TIMESTEP
from ..features.preprocess import MIN_SIDE, RESIZE_POLICIES, SIZE_MULTIPLE
from ..taps import resolve_taps
from ..timesteps import check_timestep

LOSSES = ("cosine", "mse", "l1")
VALIDATION_TIMESTEPS = (100, 261, 500, 900)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
MAX_LORA_RANK = 1024  # above the widest SD layer's width (1280 / 1024 inputs) a rank buys nothing
MAX_SIZE = 4096  # training image side in pixels
# Field kinds: (lowest, highest) for integers; "float>0" / "float>=0" for finite numbers; bool; str
_INTS = {"steps": (1, None), "batch_size": (1, 4096), "grad_accum": (1, None), "warmup_steps": (0, None),
         "timesteps_per_image": (1, 998), "lora_rank": (0, MAX_LORA_RANK), "min_side": (MIN_SIDE, None),
         "val_images": (0, None), "validate_every": (0, None), "seed": (0, 2**63 - 1), "checkpoint_every": (0, None),
         "keep_checkpoints": (1, None)}
_FLOATS = {"lr": "float>0", "adam_eps": "float>0", "weight_decay": "float>=0", "max_grad_norm": "float>=0"}
_BOOLS = ("learn_timestep", "bf16", "gradient_checkpointing", "deterministic")
_TEXTS = ("loss", "text_conditioning", "head_conditioning", "resize")
_OPTIONAL_TEXTS = ("val_data", "device", "preset", "encoder")


@dataclass
class TrainConfig:
    # optimisation (defaults: the paper, section 4.1)
    steps: int = 400
    batch_size: int = 8  # images per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step (effective batch = batch_size * grad_accum)
    lr: float = 2e-6
    warmup_steps: int = 40  # linear warmup from 0; the paper says "linear warmup" without a length
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 disables clipping
    # objective (docs/method.md, training)
    timesteps_per_image: int = 3  # I stratified timesteps per image
    loss: str = "cosine"
    taps: list[str] | None = None  # None: all 11 taps
    student_timestep: float = DEFAULT_STUDENT_TIMESTEP
    learn_timestep: bool = True
    # what the U-Nets see as text: "captions" (both the caption), "none" (both ""), "distill" (the teacher
    # the caption, the student "": paper appendix B)
    text_conditioning: str = DEFAULT_TEXT_CONDITIONING
    # model
    head_conditioning: str = DEFAULT_HEAD_CONDITIONING  # "adarms" (the release) or "film" (paper appendix E)
    lora_rank: int = 0  # 0: full fine-tune; >0: LoRA of this rank on attention and feed-forward layers
    # a fast-encoder folder (cleandift-rt distill-encoder): the student sees its latents of the clean image, the
    # teacher the VAE's of the noisy one; None: both the VAE's
    encoder: str | None = None
    bf16: bool = False  # bf16 autocast for U-Nets and heads (weights and optimiser stay fp32)
    gradient_checkpointing: bool = False
    # data
    size: int | None = None  # image side in pixels; None: the base model's resolution
    resize: str = "stretch"  # the inference resize policy (preprocess.prepare_images)
    min_side: int = MIN_SIDE  # smaller images are skipped and counted
    val_data: str | None = None  # held-out folder; None: hold out val_images from the training folder
    val_images: int = 4
    validate_every: int = 100  # 0 disables validation
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    device: str | None = None  # None: cuda when available, else cpu
    # bit-identical runs: torch.use_deterministic_algorithms, one CPU thread, cuDNN / cuBLAS pinned (docs/training.md)
    deterministic: bool = False
    preset: str | None = None
    captions: InitVar[bool | None] = None  # the old boolean: True -> text_conditioning "captions", False -> "none"

    def __post_init__(self, captions: bool | None) -> None:
        if captions is not None:  # a text_conditioning left at its default is not "given"
            given = None if self.text_conditioning == DEFAULT_TEXT_CONDITIONING else self.text_conditioning
            self.text_conditioning = text_conditioning_from_captions(captions, given, "TrainConfig")

    def check(self, origins: Mapping[str, str] | None = None) -> "TrainConfig":
        """Check every field by its kind (``origins``: where each value came from, named in errors)."""
        origins = origins or {}

        def what(name: str) -> str:
            return f"{origins[name]}: {name}" if name in origins else name

        for name, (lo, hi) in _INTS.items():
            setattr(self, name, check_int(getattr(self, name), what(name), lo, hi))
        for name, kind in _FLOATS.items():
            setattr(self, name, check_float(getattr(self, name), what(name), 0.0, lo_open=kind == "float>0"))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{what(name)} must be true or false, got {getattr(self, name)!r:.40}")
        for name in _TEXTS + _OPTIONAL_TEXTS:
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name in _OPTIONAL_TEXTS):
                raise TypeError(f"{what(name)} must be a string, got {type(value).__name__} {value!r:.40}")
        if self.size is not None:
            self.size = check_size(self.size, what("size"), SIZE_MULTIPLE, MAX_SIZE)
        self.student_timestep = float(check_timestep(check_float(self.student_timestep, what("student_timestep")),
                                                     what("student_timestep")))
        betas = self.adam_betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"{what('adam_betas')} must be two numbers [beta1, beta2], got {betas!r:.40}")
        self.adam_betas = tuple(check_float(b, f"{what('adam_betas')}[{i}]", 0.0, 1.0) for i, b in enumerate(betas))
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}: use one of {', '.join(RESIZE_POLICIES)}")
        if self.taps is not None:
            self.taps = list(resolve_taps(self.taps))
        check_text_conditioning(self.text_conditioning)
        check_head_conditioning(self.head_conditioning)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named presets: only the fields they change.
PRESETS: dict[str, dict[str, Any]] = {
    # CleanDIFT paper, section 4.1: Adam, lr 2e-6 with linear warmup, batch 8, 400 steps, I = 3.
    "paper": {},
    # The public release's training config: lr 1e-5, 2000 warmup steps, no step limit (we still need one).
    "release": {"lr": 1e-5, "warmup_steps": 2000, "steps": 100_000},
}

# Fields whose change makes a checkpoint a different experiment: --resume refuses them.
OBJECTIVE_FIELDS = ("timesteps_per_image", "loss", "taps", "lora_rank", "learn_timestep", "text_conditioning",
                    "head_conditioning", "size", "resize", "batch_size", "grad_accum", "seed")


def upgrade_fields(values: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """``values`` with an old boolean ``captions`` read as ``text_conditioning`` (refused when both
    are given and disagree)."""
    values = dict(values)
    if "captions" in values:
        values["text_conditioning"] = text_conditioning_from_captions(values.pop("captions"),
                                                                      values.get("text_conditioning"), source)
    return values


def upgrade_saved_config(saved: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint's stored config in today's fields: checkpoints from before ``text_conditioning``
    and ``head_conditioning`` trained with the boolean ``captions`` and AdaRMS heads."""
    saved = upgrade_fields(saved, source)
    saved.setdefault("text_conditioning", DEFAULT_TEXT_CONDITIONING)
    saved.setdefault("head_conditioning", DEFAULT_HEAD_CONDITIONING)
    return saved


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (numbers, true/false, null, lists) or a bare string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. lr=1e-5 or taps=[\"us6\"])")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        value = loads_json(raw, f"override {key}")
    except ValueError:
        value = raw  # a bare string; a field that wants a number says so, naming it
    return key, value


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the JSON file, then ``overrides`` (flags and key=value)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        source = f"config file {config_file}"
        file_values = read_json_file(Path(config_file), source)
        if not isinstance(file_values, dict):
            raise ValueError(f"{source} must hold a JSON object of config fields")
        values.update(upgrade_fields(file_values, source))
        origins.update(dict.fromkeys(values, source))
    given = upgrade_fields(overrides or {}, "overrides")
    values.update(given)
    origins.update(dict.fromkeys(given, "flags and overrides"))
    preset = values.pop("preset", None) or preset
    merged: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
        origins.update({k: f"preset {preset}" for k in PRESETS[preset] if k not in values})
    merged.update(values)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
    return TrainConfig(**merged, preset=preset).check(origins)
