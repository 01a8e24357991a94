"""GATE's learned amalgamation (docs/method.md, GATE) and its training objective.

For the K conv features of a bucket, one weight assigner (shared by the K features, as in the
authors' code) maps each feature to per-channel logits: Conv3x3(C -> 128, no bias), ReLU,
BatchNorm, Dropout 0.5, global average pool, Linear(128 -> C). A softmax over the K features gives
per-image, per-channel weights; the descriptor is the weighted sum, concatenated with the
attention feature, then one Conv3x3 (C + A -> C + A, no bias; ``output_conv=False`` is the paper's
"nn" setting without it). The objective is the hyperfeatures CLIP loss (docs/method.md, Diffusion Hyperfeatures) plus
``sparsity`` times the sparsity term, the negative mean L2 norm of the weights over the K features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ASSIGNER_WIDTH = 128
TEMPERATURE = 0.07  # the CLIP loss' fixed 1 / 0.07 logit scale


class Amalgamator(nn.Module):
    """``forward(conv [B, K, C, h, w], attention [B, A, h, w] or None) -> (descriptor [B, C + A, h, w], weights [B, K, C])``."""

    def __init__(self, conv_channels: int, attention_channels: int, features: int, output_conv: bool = True,
                 dropout: float = 0.5):
        super().__init__()
        if conv_channels < 1 or attention_channels < 0 or features < 1:
            raise ValueError(f"amalgamation needs C >= 1, A >= 0, K >= 1 (got {conv_channels}, {attention_channels}, "
                             f"{features})")
        self.conv_channels, self.attention_channels, self.features = conv_channels, attention_channels, features
        self.assigner = nn.Sequential(
            nn.Conv2d(conv_channels, ASSIGNER_WIDTH, 3, padding=1, bias=False), nn.ReLU(),
            nn.BatchNorm2d(ASSIGNER_WIDTH), nn.Dropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(ASSIGNER_WIDTH, conv_channels))
        width = conv_channels + attention_channels
        self.out = nn.Conv2d(width, width, 3, padding=1, bias=False) if output_conv else None

    @property
    def out_channels(self) -> int:
        return self.conv_channels + self.attention_channels

    def forward(self, conv: torch.Tensor, attention: torch.Tensor | None = None):
        if conv.ndim != 5 or conv.shape[1] != self.features or conv.shape[2] != self.conv_channels:
            raise ValueError(f"conv features must be [B, {self.features}, {self.conv_channels}, h, w], got "
                             f"{tuple(conv.shape)}")
        if (attention is None) != (self.attention_channels == 0):
            raise ValueError(f"this amalgamator expects {'an' if self.attention_channels else 'no'} attention feature")
        b, k = conv.shape[:2]
        # One assigner call per feature (as the authors' code): in training, BatchNorm's statistics are per feature.
        weights = torch.stack([self.assigner(conv[:, i]) for i in range(k)], dim=1).softmax(dim=1)
        mixed = (weights[..., None, None] * conv).sum(dim=1)
        if attention is not None:
            if attention.shape != (b, self.attention_channels, *conv.shape[3:]):
                raise ValueError(f"attention feature must be [{b}, {self.attention_channels}, {conv.shape[3]}, "
                                 f"{conv.shape[4]}], got {tuple(attention.shape)}")
            mixed = torch.cat([mixed, attention], dim=1)
        return (mixed if self.out is None else self.out(mixed)), weights


def sparsity_term(weights: torch.Tensor) -> torch.Tensor:
    """Negative mean L2 norm over the K features: lowest when each channel picks one feature."""
    return -weights.norm(dim=1).mean()


def grid_indices(points: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Flat grid indices of ``[N, 2]`` (x, y) image-pixel points: scaled per axis, rounded, clipped."""
    (w, h), (gh, gw) = image_size, grid
    x = (points[:, 0] * gw / w).round().clamp(0, gw - 1)
    y = (points[:, 1] * gh / h).round().clamp(0, gh - 1)
    return (y * gw + x).long()


def clip_loss(source: torch.Tensor, target: torch.Tensor, source_index: torch.Tensor, target_index: torch.Tensor,
              temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric cross-entropy over the cosine similarities of all pixel pairs of two ``[C, h, w]`` maps
    at the annotated points (source -> target and target -> source, averaged)."""
    s = F.normalize(source.flatten(1).T, dim=1)
    t = F.normalize(target.flatten(1).T, dim=1)
    logits = s @ t.T / temperature
    forward = F.cross_entropy(logits[source_index], target_index)
    backward = F.cross_entropy(logits.T[target_index], source_index)
    return (forward + backward) / 2
