"""DDIM inversion as Diffusion Hyperfeatures runs it, with the base model's scheduler (diffusers).

The original (``generalized_steps(run_inversion=True)`` in the authors' code) starts from the
clean latent, taken as the state at U-Net timestep -1 (alpha_bar = 1), and runs T deterministic
DDIM steps up the grid 0, r, 2r, ..., (T-1) r (r = 1000 / T): step i calls the U-Net at the
*current* state and timestep (-1, 0, r, ..., (T-2) r) and moves to the next grid point. That is
diffusers' ``DDIMInverseScheduler`` with ``timestep_spacing="leading"``, ``steps_offset=0`` and
``set_alpha_to_one=True`` (its step from grid point t reads alpha_bar at t - r, or 1 before 0),
given the noise predicted at the source timestep. The betas (and the prediction type: epsilon or
v) are the base model's own scheduler config. ``ddim_sample`` runs the same grid down again
(``DDIMScheduler``, same settings): sampling from the inverted latent returns the clean latent up
to the error of the DDIM approximation.

Saved maps: the original keeps the taps of the calls it numbers 49, 45, 40, ..., 5, 0 for T = 50
(its slot s is call T - 1 - s), i.e. U-Net timesteps -1, 60, 160, ..., 960; :func:`saved_calls`
generalises that rule to any T and S. The one-step variant is T = S = 1: a single call at -1.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch

from ..features.capture import unet_capture
from ..features.preprocess import prepare_images
from ..models import configs
from ..models.base import BaseModel
from ..models.offline import diffusers
from ..taps import TAPS, resolve_taps

DEFAULT_STEPS = 50
DEFAULT_SAVED = 11
CONV_OUT = "conv_out"  # the U-Net's last module: its output is the noise (or v) prediction
_ORIGINAL_GRID = dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=False)


def scheduler_config(base: BaseModel) -> dict:
    """The base model's scheduler config (its diffusers folder's, else SD's schedule, docs/method.md, training)."""
    path = Path(base.source) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(configs.SCHEDULER)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def schedulers(base: BaseModel):
    """(DDIMInverseScheduler, DDIMScheduler) on the base model's noise schedule with the original's grid."""
    library = diffusers()
    config = {**scheduler_config(base), **_ORIGINAL_GRID}
    inverse = library.DDIMInverseScheduler.from_config(config)
    forward = library.DDIMScheduler.from_config(config)
    if not torch.allclose(inverse.alphas_cumprod.double(), base.alphas_cumprod.double().cpu(), rtol=1e-5, atol=1e-7):
        raise ValueError(f"the scheduler config of {base.source} gives another noise schedule than the loaded model")
    return inverse, forward


def saved_calls(steps: int, saved: int) -> list[int]:
    """Indices (0 = the first U-Net call, at -1) of the calls whose taps are kept, in call order.

    The original's slots for T = 50, S = 11 are 0, 5, ..., 45 and 49 (slot s = call T - 1 - s):
    S - 1 multiples of T // (S - 1), then the first call.
    """
    if isinstance(steps, bool) or isinstance(saved, bool) or steps < 1 or not 1 <= saved <= steps:
        raise ValueError(f"need 1 <= saved steps S <= inversion steps T, got S={saved}, T={steps}")
    slots = [steps - 1] if saved == 1 else [k * (steps // (saved - 1)) for k in range(saved - 1)] + [steps - 1]
    return sorted(steps - 1 - s for s in slots)


def unet_timesteps(scheduler, steps: int) -> list[int]:
    """The U-Net timestep of each of the T inversion calls: -1, then the grid but its last point."""
    scheduler.set_timesteps(steps)
    grid = [int(t) for t in scheduler.timesteps]
    return [-1] + grid[:-1]


@torch.no_grad()
def ddim_invert(unet, scheduler, latents: torch.Tensor, embeds: torch.Tensor, steps: int,
                keep: Sequence[int] = (), taps: Sequence[str] = TAPS, full: bool = True):
    """Invert ``latents`` over ``steps`` DDIM steps; returns (the last latent, {call: {tap: B x C x h x w}}).

    ``keep``: call indices whose taps to record. ``full=False`` stops after the last kept call (the
    maps are all that is wanted; the latent returned is then the one reached so far).
    """
    scheduler.set_timesteps(steps)
    grid = [int(t) for t in scheduler.timesteps]
    keep = set(keep)
    stop = None if full or not keep else max(keep)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    x = latents
    for i, t_next in enumerate(grid):
        t = -1 if i == 0 else grid[i - 1]
        wanted = tuple(taps) if i in keep else ()
        if i == stop:  # the last maps wanted: this call needs no noise prediction, and nothing follows
            kept[i] = unet_capture(unet, x, t, embeds, taps=wanted)
            break
        out = unet_capture(unet, x, t, embeds, taps=wanted, modules=(CONV_OUT,))
        prediction = out.pop(CONV_OUT)
        if wanted:
            kept[i] = out
        x = scheduler.step(prediction, t_next, x).prev_sample
    return x, kept


@torch.no_grad()
def ddim_sample(unet, scheduler, latents: torch.Tensor, embeds: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM sampling down the same grid (the inverse of :func:`ddim_invert`)."""
    scheduler.set_timesteps(steps)
    x = latents
    for t in scheduler.timesteps:
        prediction = unet_capture(unet, x, int(t), embeds, modules=(CONV_OUT,))[CONV_OUT]
        x = scheduler.step(prediction, int(t), x).prev_sample
    return x


@dataclass
class InversionSettings:
    """The ``inversion`` / ``one-step`` feature source: T steps, S of them kept, size, prompt, seed."""

    steps: int = DEFAULT_STEPS
    saved: int = DEFAULT_SAVED
    size: int = 512
    prompt: str = ""
    seed: int = 0  # of the posterior sample, mixed with each image's pixels (the same draw every time)

    @classmethod
    def one_step(cls, size: int = 512, prompt: str = "", seed: int = 0) -> InversionSettings:
        return cls(steps=1, saved=1, size=size, prompt=prompt, seed=seed)


class InversionExtractor:
    """The base model's taps at the kept steps of DDIM inversion, per image: ``{tap: S x C x h x w}``."""

    def __init__(self, base: BaseModel, settings: InversionSettings, taps: Sequence[str] | None = None):
        saved_calls(settings.steps, settings.saved)  # checks T and S
        self.base, self.settings = base, settings
        self.taps = resolve_taps(taps)
        self.inverse, _ = schedulers(base)
        calls = saved_calls(settings.steps, settings.saved)
        timesteps = unet_timesteps(self.inverse, settings.steps)
        self.calls = calls
        self.timesteps = tuple(float(timesteps[i]) for i in calls)  # ascending: -1 first
        self._embeds = None

    @property
    def device(self) -> torch.device:
        return self.base.device

    def embeds(self) -> torch.Tensor:
        if self._embeds is None:
            self._embeds = self.base.encode_prompt(self.settings.prompt).to(self.device)
        return self._embeds

    @torch.no_grad()
    def extract(self, image) -> dict[str, np.ndarray]:
        """``{tap: float32 S x C x h x w}`` of one image; its posterior sample is seeded by its pixels."""
        s = self.settings
        pixels = prepare_images([image], (s.size, s.size), "stretch").pixels
        digest = hashlib.sha256(str(s.seed).encode() + pixels.numpy().tobytes()).digest()
        pixels = pixels.to(self.device)
        generator = torch.Generator(self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        latents = self.base.encode_images(pixels, sample=True, generator=generator)
        _, kept = ddim_invert(self.base.unet, self.inverse, latents, self.embeds(), s.steps, keep=self.calls,
                              taps=self.taps, full=False)
        return {tap: torch.stack([kept[i][tap][0] for i in self.calls]).float().cpu().numpy() for tap in self.taps}
