"""PyTorch backend for Robot-DIFT encoder packages (``models.robot_dift``): the package's own math, eagerly.

Pixels (prepared by the Engine) -> base VAE -> ``(mode - shift) * scale`` latents (or the seeded
posterior sample, when asked) -> the student U-Net at the learned timestep with the instruction's
CLIP embedding -> taps, the forward stopped after the last one asked for. Instructions are encoded
by the base's text encoder once per distinct text (``BaseModel.encode_prompt`` caches them), so a
robot that repeats "insert the pin" every frame pays for its text encoder once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ...features.capture import unet_taps
from ...features.preprocess import check_model_size
from ...formats.artifact import ArtifactInfo, tap_records
from ...kernels.precision import cpu_precision
from ...models import load_base, move_module
from ...models.robot_dift import choose_latent, load_robot_dift, robot_dift_latents
from ...taps import TAPS
from .common import Backend
from .torch import ANY_SIZE, PRECISIONS

DEFAULT_SIZE = (256, 256)  # Robot-DIFT's camera frames


class RobotDiftBackend(Backend):
    name = "pytorch"  # any batch (min_batch 1, max_batch None)

    def __init__(self, path: str | Path, base=None, device: str | None = None, precision: str | None = None,
                 size=None, resize: str = "stretch", prompt: str = "", allow_pickle: bool = False,
                 latent: str | None = None, seed: int | None = None):
        self.path = Path(path)
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if base is None:
            raise ValueError(f"{self.path} is a Robot-DIFT package: pass base=DIR, the SD 2.1 base model folder that "
                             "provides the VAE, the text encoder and the U-Net architecture")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; on the CPU use 'bf16' (or 'fp32')")
        if device.type == "cpu":
            precision = cpu_precision(precision, stacklevel=4)
        self.base = load_base(base) if isinstance(base, (str, Path)) else base
        self.package = load_robot_dift(self.path, self.base, allow_pickle=allow_pickle)
        self.latent, self.seed = choose_latent(self.package, latent, seed)
        if prompt and not self.package.use_text_condition:
            raise ValueError(f"{self.path.name} takes no instruction (use_text_condition false): drop prompt=")
        self.prompt = prompt
        self.base.to(device=device, dtype=torch.float32)
        self.unet = move_module(self.package.student.unet, device, torch.float32)
        self.device, self.precision = device, precision
        served = [t for t in TAPS if t in self.package.feature_dims]  # what the package says it serves
        self.info = ArtifactInfo(
            taps=tap_records(served, self.base.block_out_channels), height=None, width=None,
            size_range=list(ANY_SIZE), default_size=list(check_model_size(size or DEFAULT_SIZE)), resize=resize,
            batch={"min": 1, "opt": 1, "max": None}, base_model=Path(self.base.source).name,
            variant=self.base.variant, student=self.path.name, prompt=prompt,
            timestep=float(self.package.student.timestep),
            cross_attention_dim=int(self.base.unet.config.cross_attention_dim),
            prompt_tokens=int(getattr(self.base.tokenizer, "model_max_length", 77) or 77),
            block_out_channels=self.base.block_out_channels, scaling_factor=self.base.scaling_factor,
            text_conditioning=self.package.student.text_conditioning,
            extra={"precision": precision, "robot_dift": self.package.record(self.latent, self.seed)})

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "threads": torch.get_num_threads(), "latent": self.latent}

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """``[B, L, D]`` CLIP embeddings of the instructions (cached per distinct text by the base model)."""
        if not self.package.use_text_condition and any(prompts):
            raise ValueError(f"{self.path.name} takes no instruction (use_text_condition false): pass no prompt")
        return self.base.encode_prompt(list(prompts)).float()

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.device)
        if embeds is None:
            embeds = self.encode_prompt([self.prompt]).expand(len(pixels), -1, -1)
        with self._autocast():
            latents = robot_dift_latents(self.base.vae, pixels, self.base.scaling_factor, self.latent, self.seed)
            feats = unet_taps(self.unet, latents, self.package.student.timestep, embeds.to(self.device), taps)
        return {t: f.float().contiguous() for t, f in feats.items()}
