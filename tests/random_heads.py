"""Projection heads with every parameter perturbed, the zero-initialised ones too, so every term of
the head matters (at initialisation a head is the identity and a comparison proves nothing)."""

from __future__ import annotations

import torch

from cleandift_rt.models.heads import ProjectionHeads


def random_heads(channels: dict[str, int], seed: int = 0, scale: float = 0.05,
                 conditioning: str = "adarms") -> ProjectionHeads:
    torch.manual_seed(seed)
    heads = ProjectionHeads(channels, conditioning=conditioning)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * scale)
    return heads.eval()
