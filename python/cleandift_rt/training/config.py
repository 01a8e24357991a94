"""Training configuration as plain data, with the paper's defaults and the release's values as presets.

Precedence when the CLI builds a config: defaults < preset < ``--config`` JSON file < explicit flags
< ``key=value`` overrides. Every value is JSON-serialisable; the whole config is stored in each
checkpoint so ``--resume`` can refuse a run whose objective would silently change.

Older configs and checkpoints carry the boolean ``captions``; it reads as ``text_conditioning``
(true: "captions", false: "none"), so their runs resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..conditioning import (DEFAULT_HEAD_CONDITIONING, DEFAULT_TEXT_CONDITIONING, check_head_conditioning,
                            check_text_conditioning, text_conditioning_from_captions)
from ..models import DEFAULT_STUDENT_TIMESTEP
from ..features.preprocess import MIN_SIDE, RESIZE_POLICIES
from ..taps import resolve_taps

LOSSES = ("cosine", "mse", "l1")
VALIDATION_TIMESTEPS = (100, 261, 500, 900)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


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
    # objective (SPEC section 5)
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
    preset: str | None = None
    captions: InitVar[bool | None] = None  # the old boolean: True -> text_conditioning "captions", False -> "none"

    def __post_init__(self, captions: bool | None) -> None:
        if captions is not None:  # a text_conditioning left at its default is not "given"
            given = None if self.text_conditioning == DEFAULT_TEXT_CONDITIONING else self.text_conditioning
            self.text_conditioning = text_conditioning_from_captions(captions, given, "TrainConfig")

    def check(self) -> "TrainConfig":
        def positive(name):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

        for name in ("steps", "batch_size", "grad_accum", "lr", "timesteps_per_image", "keep_checkpoints"):
            positive(name)
        for name in ("warmup_steps", "checkpoint_every", "validate_every", "val_images", "lora_rank", "max_grad_norm",
                     "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}: use one of {', '.join(RESIZE_POLICIES)}")
        if self.timesteps_per_image > 998:
            raise ValueError("timesteps_per_image must be at most 998 (one stratum per timestep)")
        if self.taps is not None:
            self.taps = list(resolve_taps(self.taps))
        check_text_conditioning(self.text_conditioning)
        check_head_conditioning(self.head_conditioning)
        if self.min_side < MIN_SIDE:
            raise ValueError(f"min_side must be at least {MIN_SIDE} (the smallest image the U-Net accepts)")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
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
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the JSON file, then ``overrides`` (flags and key=value)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            file_values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"config file {path} must hold a JSON object of config fields")
        values.update(upgrade_fields(file_values, f"config file {path}"))
    values.update(upgrade_fields(overrides or {}, "overrides"))
    preset = values.pop("preset", None) or preset
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update(values)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
    return TrainConfig(**merged, preset=preset).check()
