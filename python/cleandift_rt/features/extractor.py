"""The PyTorch reference extractors: CleanDIFT students and the noisy DIFT baseline.

``ReferenceExtractor`` is the PyTorch backend of the Engine and the reference every other
backend and kernel is checked against: images -> size policy -> VAE encoder (posterior mean; or a
fast encoder, ``models.fast_encoder``) -> student U-Net at its timestep with the "" prompt (or given
embeddings) -> ``{tap: B x C x h x w}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .capture import unet_taps
from ..models import BaseModel, Student, load_base, load_student, move_module
from ..models.fast_encoder import FastEncoder
from .preprocess import check_model_size, check_policy, prepare_images
from ..taps import DEFAULT_TAP, resolve_taps


def check_prompt_embeds(prompt_embeds, batch: int, dim: int) -> torch.Tensor:
    """``[L, D]`` (shared) or ``[B, L, D]`` text embeddings, finite, with the U-Net's width."""
    e = torch.as_tensor(prompt_embeds)
    if not e.dtype.is_floating_point:
        raise TypeError(f"prompt_embeds must be floating point, got {e.dtype}")
    if e.ndim == 2:
        e = e.unsqueeze(0).expand(batch, -1, -1)
    if e.ndim != 3 or e.shape[0] != batch or e.shape[2] != dim:
        raise ValueError(f"prompt_embeds must be [L, {dim}] or [{batch}, L, {dim}], got {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError("prompt_embeds contain NaN or Inf")
    return e


class _TapExtractor:
    """What both extractors share: a base model for VAE and text, a size policy, a device."""

    def __init__(self, base: BaseModel, size: int | Sequence[int] | None, resize: str, prompt: str,
                 device, dtype: torch.dtype):
        self.base = base
        self.size = check_model_size(size if size is not None else base.resolution)
        self.resize = check_policy(resize)
        self.prompt = prompt
        self.device = torch.device(device)
        self.dtype = dtype
        base.to(device=self.device, dtype=dtype)

    def _check_embeds(self, prompt_embeds, batch: int) -> torch.Tensor | None:
        if prompt_embeds is None:
            return None
        return check_prompt_embeds(prompt_embeds, batch, int(self.base.unet.config.cross_attention_dim))

    def _embeds(self, batch: int, prompt_embeds) -> torch.Tensor:
        return self._text(batch, self._check_embeds(prompt_embeds, batch))

    def _text(self, batch: int, embeds: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's text input: checked ``[B, L, D]`` embeddings, or the default prompt's."""
        e = self.base.encode_prompt(self.prompt).expand(batch, -1, -1) if embeds is None else embeds
        return e.to(device=self.device, dtype=self.dtype)

    def _pixels(self, images) -> torch.Tensor:
        return prepare_images(images, self.size, self.resize).pixels.to(device=self.device, dtype=self.dtype)


class ReferenceExtractor(_TapExtractor):
    """CleanDIFT features in PyTorch: one student U-Net pass on the clean latent. ``encoder``: a
    ``FastEncoder`` that gives the latents in place of the base VAE's encoder."""

    def __init__(self, student: Student, base: BaseModel, size=None, resize: str = "stretch", prompt: str = "",
                 device="cpu", dtype: torch.dtype = torch.float32, sample_posterior: bool = False,
                 encoder: FastEncoder | None = None):
        super().__init__(base, size, resize, prompt, device, dtype)
        self.student = student
        move_module(student.unet, self.device, dtype)
        if encoder is not None and sample_posterior:
            raise ValueError("sample_posterior= draws from the VAE's posterior; a fast encoder has none")
        self.encoder = None if encoder is None else move_module(encoder.eval(), self.device, dtype)
        if student.heads is not None:
            student.heads.to(device=self.device)
        self.sample_posterior = sample_posterior

    @classmethod
    def from_paths(cls, student: str | Path, base: str | Path, **kwargs) -> "ReferenceExtractor":
        base_model = load_base(base)
        return cls(load_student(student, base_model), base_model, **kwargs)

    @torch.no_grad()
    def extract(self, images, taps=None, prompt_embeds=None) -> dict[str, torch.Tensor]:
        wanted = resolve_taps(taps)
        pixels = self._pixels(images)
        return self.features(pixels, self._check_embeds(prompt_embeds, pixels.shape[0]), wanted)

    __call__ = extract

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps=None) -> dict[str, torch.Tensor]:
        """``extract`` on what was checked already: prepared pixels (``B x 3 x H x W`` in [-1, 1],
        ``prepare_images``) and checked ``[B, L, D]`` embeddings, or None for the default prompt. The
        Engine's PyTorch backend runs this, so each image and embedding is checked once on its way."""
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.encoder is not None:
            latents = self.encoder(pixels)
        else:
            latents = self.base.encode_images(pixels, sample=self.sample_posterior)
        return unet_taps(self.student.unet, latents, self.student.timestep, self._text(pixels.shape[0], embeds), taps)

    @torch.no_grad()
    def project(self, features: dict[str, torch.Tensor], t) -> dict[str, torch.Tensor]:
        """Student features as the teacher would see them at timestep ``t`` (needs a ``_full`` file)."""
        if self.student.heads is None:
            raise ValueError(f"{self.student.source} has no projection heads: project() needs a '_full' student file")
        heads = self.student.heads
        return {tap: heads(tap, f.to(next(heads.parameters()).device).float(), t) for tap, f in features.items()}


class DiftExtractor(_TapExtractor):
    """The noisy DIFT baseline (docs/method.md, noisy baseline): base U-Net on ``ensemble`` noised copies at ``t``, averaged."""

    def __init__(self, base: BaseModel, t: int = 261, ensemble: int = 8, seed: int = 0, size=None,
                 resize: str = "stretch", prompt: str = "", device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__(base, size, resize, prompt, device, dtype)
        if not 0 <= t < len(base.alphas_cumprod):
            raise ValueError(f"timestep t={t} outside the scheduler's range [0, {len(base.alphas_cumprod) - 1}]")
        if ensemble < 1:
            raise ValueError(f"ensemble size must be >= 1, got {ensemble}")
        self.t, self.ensemble, self.seed = int(t), int(ensemble), int(seed)

    @torch.no_grad()
    def extract(self, images, taps=None, prompt_embeds=None) -> dict[str, torch.Tensor]:
        wanted = resolve_taps(taps if taps is not None else DEFAULT_TAP)
        pixels = self._pixels(images)
        embeds = self._embeds(pixels.shape[0], prompt_embeds)
        # One generator per call, seeded: the same images give the same features every time.
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        abar = self.base.alphas_cumprod[self.t].item()
        out: dict[str, list[torch.Tensor]] = {t: [] for t in wanted}
        for i in range(pixels.shape[0]):
            x0 = self.base.vae.encode(pixels[i : i + 1]).latent_dist
            eps_post = torch.randn(x0.mean.shape, generator=gen).to(self.device, self.dtype)
            latent = (x0.mean + x0.std * eps_post) * self.base.scaling_factor
            latent = latent.expand(self.ensemble, -1, -1, -1)
            noise = torch.randn(latent.shape, generator=gen).to(self.device, self.dtype)
            noisy = abar**0.5 * latent + (1 - abar) ** 0.5 * noise
            feats = unet_taps(self.base.unet, noisy, self.t, embeds[i : i + 1].expand(self.ensemble, -1, -1), wanted)
            for tap, f in feats.items():
                out[tap].append(f.mean(dim=0, keepdim=True))
        return {tap: torch.cat(fs) for tap, fs in out.items()}

    __call__ = extract
