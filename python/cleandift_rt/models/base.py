"""A Stable Diffusion base model as cleandift-rt uses it, and facts derived from its configuration.

``BaseModel`` holds the parts CleanDIFT needs (U-Net, VAE, text encoder, tokenizer, the noise
schedule); ``models.loading`` fills it from a diffusers folder or a single file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import configs
from .offline import diffusers

VAE_DOWNSCALE = 8


@dataclass
class BaseModel:
    """A Stable Diffusion base model: the parts CleanDIFT uses (no decoder-side pipeline)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None
    tokenizer: object | None
    alphas_cumprod: torch.Tensor
    source: str
    variant: str = "custom"
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def resolution(self) -> int:
        """Native image size in pixels (768 for SD 2.1, 512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * VAE_DOWNSCALE

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def block_out_channels(self) -> list[int]:
        return list(self.unet.config.block_out_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[B, 77, D]`` as the SD pipelines compute them (cached per prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"base model {self.source} has no text encoder/tokenizer: pass prompt embeddings "
                             "explicitly or use a diffusers folder with text_encoder/ and tokenizer/")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
            for p, h in zip(missing, hidden):
                self._prompt_cache[p] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] ``B x 3 x H x W`` -> latents times the VAE scaling factor.

        The posterior mean by default (deterministic, what an engine wants); ``sample=True`` draws
        from the posterior as training does.
        """
        dist = self.vae.encode(images).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return latents * self.scaling_factor

    def to(self, device=None, dtype=None) -> "BaseModel":
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                move_module(m, device, dtype)
        self._prompt_cache.clear()
        return self


def move_module(module: nn.Module, device=None, dtype=None) -> nn.Module:
    """``module.to`` that skips the no-op casts diffusers warns about."""
    p = next(module.parameters(), None)
    if p is None:
        return module
    if device is not None and p.device != torch.device(device):
        module.to(device=device)
    if dtype is not None and p.dtype != dtype:
        module.to(dtype=dtype)
    return module


def detect_variant(unet_config) -> str:
    """``sd21``/``sd15``/``tiny`` when the U-Net config matches one of ours, else ``custom``."""
    for name, ref in configs.UNET.items():
        if all(_config_value(unet_config, k) == _normalise(v) for k, v in ref.items()
               if k in ("block_out_channels", "cross_attention_dim", "use_linear_projection", "attention_head_dim")):
            return name
    return "custom"


def _normalise(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _config_value(config, key):
    value = config[key] if isinstance(config, dict) else getattr(config, key)
    return _normalise(value)


def schedule_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = diffusers().DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
    return sched.alphas_cumprod.clone()
