"""Held-out validation: how well the student matches the teacher at fixed timesteps.

For each fixed timestep (100, 261, 500, 900 by default) and tap: the mean cosine over channels
between the teacher's features on ``x_t`` and (a) the student's features projected by the head at
``t`` and (b) the raw student features. A student adapted to a fast encoder sees that encoder's
latents (``student_latents``); the teacher always noises the VAE's. Latents are posterior means and the noise is drawn from a
fixed seed, so numbers from different steps (and runs) are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..features.capture import unet_taps
from ..models.heads import ProjectionHeads
from .objective import autocast, cosine_map, teacher_taps


@dataclass
class ValidationSet:
    latents: torch.Tensor  # N x 4 x h x w, posterior means
    cond: torch.Tensor  # N x 77 x D, the teacher's text
    noise: torch.Tensor  # N x 4 x h x w, fixed
    student_cond: torch.Tensor | None = None  # the student's text when it differs (distilled text conditioning)
    student_latents: torch.Tensor | None = None  # what the student sees when it differs: a fast encoder's latents


def mean_over_taps(per_tap: dict[str, float]) -> float:
    return sum(per_tap.values()) / len(per_tap)


@torch.no_grad()
def validate(val: ValidationSet, student: nn.Module, teacher: nn.Module, heads: ProjectionHeads,
             student_timestep: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, batch_size: int,
             bf16: bool = False) -> dict:
    """``{"projected": {t: {tap: cos}}, "unprojected": {...}, "mean_projected": {t: cos}, "mean_unprojected": ...}``."""
    taps = heads.taps
    n = val.latents.shape[0]
    sums = {kind: {t: {tap: 0.0 for tap in taps} for t in timesteps} for kind in ("projected", "unprojected")}
    was_training = student.training, heads.training
    student.eval(), heads.eval()
    try:
        for start in range(0, n, batch_size):
            x0 = val.latents[start:start + batch_size]
            cond = val.cond[start:start + batch_size]
            student_cond = cond if val.student_cond is None else val.student_cond[start:start + batch_size]
            noise = val.noise[start:start + batch_size]
            clean = x0 if val.student_latents is None else val.student_latents[start:start + batch_size]
            b = x0.shape[0]
            with autocast(x0.device, bf16):
                feats = unet_taps(student, clean, student_timestep.expand(b), student_cond, taps)
                for t in timesteps:
                    t_rows = torch.full((b,), int(t), device=x0.device, dtype=torch.long)
                    target = teacher_taps(teacher, x0, t_rows, cond, alphas_cumprod, noise, taps)
                    for tap in taps:
                        projected = heads(tap, feats[tap], t_rows)
                        # per-image means, weighted by image count so uneven last batches average right
                        sums["projected"][t][tap] += float(cosine_map(projected, target[tap]).mean(dim=(1, 2)).sum())
                        sums["unprojected"][t][tap] += float(cosine_map(feats[tap], target[tap]).mean(dim=(1, 2)).sum())
    finally:
        student.train(was_training[0]), heads.train(was_training[1])
    result: dict = {}
    for kind, per_t in sums.items():
        result[kind] = {str(t): {tap: v / n for tap, v in per_tap.items()} for t, per_tap in per_t.items()}
        result[f"mean_{kind}"] = {t: mean_over_taps(per_tap) for t, per_tap in result[kind].items()}
    return result


def format_validation(step: int, result: dict) -> str:
    """A short table: one line per timestep with the mean projected and unprojected cosine."""
    lines = [f"validation at step {step}: mean cosine over taps (student vs teacher)",
             "      t   projected   unprojected"]
    for t, proj in result["mean_projected"].items():
        lines.append(f"  {t:>5}   {proj:9.4f}   {result['mean_unprojected'][t]:11.4f}")
    return "\n".join(lines)
