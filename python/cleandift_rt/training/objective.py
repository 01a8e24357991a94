"""The CleanDIFT objective (docs/method.md, training): stratified timesteps, noising, and the per-tap feature loss.

The student sees the clean latent ``x0`` once per image (or ``student_x0``, a fast encoder's latent
of the same clean image: ``models.fast_encoder``); its taps are shared by the image's I
timesteps (repeated only after the U-Net, before the heads). The teacher sees ``x_t`` at ``t`` and
stops after the last tap. The public release instead runs the student on the I-times repeated
batch, which costs I student forwards and backwards for the same loss value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..features.capture import unet_taps
from ..models.heads import ProjectionHeads

MAX_TIMESTEP = 999


def stratified_timesteps(batch: int, per_image: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``[batch, per_image]`` integer timesteps ``t_i = floor(1 + (i + u) * 998 / I)``, u ~ U[0, 1).

    One draw in each of I equal strata of [1, 999), so every image is matched across the whole
    noise range (the paper's stratified sampling).
    """
    u = torch.rand(batch, per_image, generator=generator, device=device)
    i = torch.arange(per_image, device=device, dtype=u.dtype)
    return torch.floor(1 + (i + u) * (MAX_TIMESTEP - 1) / per_image).long()


def add_noise(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with the base model's own schedule."""
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t].view(-1, *([1] * (x0.ndim - 1)))
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def cosine_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over channels, per pixel, in fp32: ``B x h x w``."""
    return F.cosine_similarity(pred.float(), target.float(), dim=1, eps=1e-8)


def tap_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """One tap's loss: mean negative cosine over channels (default), or MSE / L1 (the paper's ablations)."""
    if kind == "cosine":
        return -cosine_map(pred, target).mean()
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float())
    if kind == "l1":
        return F.l1_loss(pred.float(), target.float())
    raise ValueError(f"unknown loss {kind!r}: use cosine, mse or l1")


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar with grad
    cosine: dict[str, float]  # mean cosine per tap (projected student vs teacher), whatever the loss
    timesteps: torch.Tensor  # [B, I]


def teacher_taps(teacher: nn.Module, x0: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 alphas_cumprod: torch.Tensor, noise: torch.Tensor, taps) -> dict[str, torch.Tensor]:
    """Teacher taps on ``x_t`` (one row per (image, timestep)); the forward stops after the last tap."""
    with torch.no_grad():
        x_t = add_noise(x0, t, alphas_cumprod, noise)
        return unet_taps(teacher, x_t, t, cond, taps)


def distillation_step(student: nn.Module, teacher: nn.Module, heads: ProjectionHeads, student_timestep: torch.Tensor,
                      x0: torch.Tensor, cond: torch.Tensor, alphas_cumprod: torch.Tensor, per_image: int,
                      generator: torch.Generator | None, loss_kind: str = "cosine", taps=None,
                      bf16: bool = False, student_cond: torch.Tensor | None = None,
                      student_x0: torch.Tensor | None = None) -> StepOutput:
    """Loss of one micro-batch of clean latents ``x0`` (B x 4 x h x w) with text embeddings ``cond``.

    ``cond`` is what the teacher sees; the student sees ``student_cond`` (default: the same), which
    distilled text conditioning sets to the empty prompt's embeddings (paper appendix B). The teacher
    noises ``x0``; the student sees ``student_x0`` (default: ``x0``), a fast encoder's latents of the
    same images, so it learns to undo that encoder's error.

    Draws, from ``generator`` in this order, the timesteps and the noise. Rows of the teacher batch
    are image-major: (image 0, t_0), (image 0, t_1), ..., (image 1, t_0), ...
    """
    taps = heads.taps if taps is None else taps
    b = x0.shape[0]
    t = stratified_timesteps(b, per_image, generator, x0.device)
    t_rows = t.reshape(-1)
    x0_rows = x0.repeat_interleave(per_image, dim=0)
    cond_rows = cond.repeat_interleave(per_image, dim=0)
    noise = torch.randn(x0_rows.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    with autocast(x0.device, bf16):
        target = teacher_taps(teacher, x0_rows, t_rows, cond_rows, alphas_cumprod, noise, taps)
        student_cond = cond if student_cond is None else student_cond
        clean = x0 if student_x0 is None else student_x0
        feats = unet_taps(student, clean, student_timestep.expand(b), student_cond, taps)  # once per image
        total = x0.new_zeros((), dtype=torch.float32)
        cosine = {}
        for tap in taps:
            projected = heads(tap, feats[tap].repeat_interleave(per_image, dim=0), t_rows)
            if loss_kind == "cosine":
                cos = cosine_map(projected, target[tap]).mean()
                total = total - cos
            else:
                total = total + tap_loss(projected, target[tap], loss_kind)
                with torch.no_grad():
                    cos = cosine_map(projected, target[tap]).mean()
            cosine[tap] = float(cos.detach())
    return StepOutput(total, cosine, t)
