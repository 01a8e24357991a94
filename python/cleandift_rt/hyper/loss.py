"""The training objective of Diffusion Hyperfeatures (docs/method.md, Diffusion Hyperfeatures): a CLIP-style symmetric loss.

Cosine similarity of every source cell with every target cell of the two descriptor grids, times
1 / 0.07 (fixed); cross-entropy from each annotated source keypoint's cell over all target cells
(label: its target keypoint's cell) plus the same from target to source, averaged. Keypoints go
from image pixels to the grid by scaling x and y separately, rounding and clipping.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def grid_indices(points, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Flat row-major cell indices of keypoints ``[N, 2]`` (x, y in an image of ``(W, H)`` pixels) on a
    ``(h, w)`` grid: scaled to the grid per axis, rounded, clipped (the original's ``points_to_idxs``)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (width, height), (h, w) = image_size, grid
    x = np.clip(np.round(p[:, 0] * w / width), 0, w - 1)
    y = np.clip(np.round(p[:, 1] * h / height), 0, h - 1)
    return torch.from_numpy((y * w + x).astype(np.int64))


def clip_loss(source: torch.Tensor, target: torch.Tensor, source_index: torch.Tensor, target_index: torch.Tensor,
              temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric cross-entropy of two ``[C, h, w]`` descriptor maps at corresponding cells (``[N]`` each)."""
    if source.ndim != 3 or target.shape[0] != source.shape[0] or target.ndim != 3:
        raise ValueError(f"descriptor maps must be [C, h, w] with the same C, got {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    if source_index.shape != target_index.shape or source_index.ndim != 1 or len(source_index) == 0:
        raise ValueError(f"need N >= 1 corresponding cells in each map, got {tuple(source_index.shape)} and "
                         f"{tuple(target_index.shape)}")
    a = F.normalize(source.flatten(1), dim=0)  # [C, h*w], unit columns
    b = F.normalize(target.flatten(1), dim=0)
    source_index, target_index = source_index.to(a.device), target_index.to(a.device)
    # only the annotated rows of the two similarity matrices are needed: [N, h*w] each
    forward = (a[:, source_index].T @ b) / temperature
    backward = (b[:, target_index].T @ a) / temperature
    return (F.cross_entropy(forward, target_index) + F.cross_entropy(backward, source_index)) / 2
