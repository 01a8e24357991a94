"""Monocular depth with a linear probe over depth bins (CleanDIFT section 4.3; the DINOv2 / Binsformer
linear protocol without upsampling the features).

The probe maps each cell of the tap's grid to 256 scores ``s`` for uniform bins with centres
``c = linspace(min_depth, max_depth, 256)``. The scores are normalised linearly as in AdaBins and
DINOv2's ``norm_strategy="linear"``: ``p = (relu(s) + 0.1) / sum(relu(s) + 0.1)``; the depth is
the expectation ``sum_k p_k c_k``, upsampled bilinearly (align_corners=False) to the ground truth's
size and clipped to ``[min_depth, max_depth]``.

Loss (per batch, over the valid ground-truth pixels): ``CE + SI-log``

* ``CE``: cross-entropy of ``p`` against each ground-truth pixel's nearest bin, each pixel counted in
  the grid cell that nearest upsampling maps it to (exactly the pixel-level cross-entropy of the
  nearest-upsampled ``p``, computed on the grid): the classification loss over bins of the paper's
  section 4.3 (depth as classification over uniform bins: Cao et al. 2017);
* ``SI-log``: ``sqrt(var(g) + 0.15 mean(g)^2)``, ``g = log(d + 1e-3) - log(d* + 1e-3)`` on the
  upsampled prediction ``d`` at full resolution: DINOv2's / Binsformer's ``SigLoss`` (without its
  100-step warm-up), the protocol's regression term.

Metrics (the BTS / Binsformer evaluation): per test image over the valid pixels, ``rmse`` (metres),
``abs_rel`` and ``delta1`` (share with ``max(d/d*, d*/d) < 1.25``), then averaged over images. A pixel
is valid when ``min_depth < d* < max_depth`` (``<= max_depth`` for folder data, whose default maximum
is the data's own) and, for NYUv2, inside the Eigen crop (rows 45:471, columns 41:601 of 480 x 640).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .training import LinearProbe

N_BINS = 256
NORM_EPS = 0.1  # AdaBins / DINOv2 linear normalisation
SILOG_EPS, SILOG_LAMBDA = 1e-3, 0.15
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), columns [41, 601) of a 480 x 640 NYUv2 image


@dataclass(frozen=True)
class DepthProtocol:
    """Which ground-truth pixels count: ``min_depth < d* < max_depth`` (``<=`` when not
    ``strict_max``), inside the Eigen crop when ``eigen_crop``. ``max_depth=None`` tells
    ``run_dense`` to use the training ground truth's maximum (or a loaded probe's)."""

    min_depth: float = 1e-3
    max_depth: float = 10.0
    eigen_crop: bool = True
    strict_max: bool = True

    def valid(self, gt: np.ndarray) -> np.ndarray:
        gt = np.asarray(gt)
        below = gt < self.max_depth if self.strict_max else gt <= self.max_depth
        mask = (gt > self.min_depth) & below
        if self.eigen_crop:
            if gt.shape[-2:] != (480, 640):
                raise ValueError(f"the Eigen crop is defined on 480 x 640 NYUv2 images, got {gt.shape[-2:]}")
            r0, r1, c0, c1 = EIGEN_CROP
            crop = np.zeros(gt.shape[-2:], dtype=bool)
            crop[r0:r1, c0:c1] = True
            mask &= crop
        return mask


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict | None:
    """RMSE (metres), abs-rel and delta1 of one image over ``valid`` pixels (None when there are none)."""
    p, g = np.asarray(pred, dtype=np.float64)[valid], np.asarray(gt, dtype=np.float64)[valid]
    if g.size == 0:
        return None
    ratio = np.maximum(p / g, g / p)
    return {"rmse": float(np.sqrt(np.mean((p - g) ** 2))), "abs_rel": float(np.mean(np.abs(p - g) / g)),
            "delta1": float(np.mean(ratio < 1.25))}


_CELL_MAPS: dict[tuple, torch.Tensor] = {}
_RESIZE: dict[tuple, torch.Tensor] = {}


def cell_index(size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` int64: the grid cell ``F.interpolate(mode="nearest")`` takes each pixel from."""
    key = (tuple(size), tuple(grid))
    if key not in _CELL_MAPS:
        cells = torch.arange(grid[0] * grid[1], dtype=torch.float64).reshape(1, 1, *grid)
        _CELL_MAPS[key] = F.interpolate(cells, size=tuple(size), mode="nearest")[0, 0].long()
    return _CELL_MAPS[key]


def sparse_counts(labels: np.ndarray, keep: np.ndarray, grid: tuple[int, int], classes: int):
    """``(index, count)`` over the (label, grid cell) pairs that occur among the kept pixels, cells
    assigned as nearest upsampling does: ``index = label * h * w + cell`` (a position in a flattened
    ``[classes, h, w]`` map) and ``count`` the number of such pixels."""
    cells = cell_index(labels.shape, grid)[torch.from_numpy(np.ascontiguousarray(keep))]
    lab = torch.from_numpy(np.ascontiguousarray(labels[keep]).astype(np.int64))
    index, count = torch.unique(lab * (grid[0] * grid[1]) + cells, return_counts=True)
    return index, count.float()


def resize_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """``[n_out, n_in]``: 1-D linear interpolation as F.interpolate does it (align_corners=False). Bilinear
    upsampling is separable, so ``R_h @ x @ R_w.T`` equals ``F.interpolate(x, mode="bilinear")``, with a
    backward pass of two small matrix products instead of a full-resolution scatter."""
    key = (int(n_out), int(n_in))
    if key not in _RESIZE:
        eye = torch.eye(n_in, dtype=torch.float64)[None]
        _RESIZE[key] = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.float().contiguous()
    return _RESIZE[key]


class DepthProbe(LinearProbe):
    """Linear probe over ``n_bins`` uniform depth bins on ``[min_depth, max_depth]`` (module docstring)."""

    kind = "depth"
    initial_bias = 1.0  # every score starts in relu's linear part: a uniform p, gradients everywhere

    def __init__(self, channels: int, n_bins: int = N_BINS, min_depth: float = 1e-3, max_depth: float = 10.0):
        if not 0 <= min_depth < max_depth or n_bins < 2:
            raise ValueError(f"need 0 <= min_depth < max_depth and n_bins >= 2, got {min_depth}, {max_depth}, {n_bins}")
        super().__init__(channels, n_bins)
        self.n_bins, self.min_depth, self.max_depth = int(n_bins), float(min_depth), float(max_depth)
        self.register_buffer("centres", torch.linspace(self.min_depth, self.max_depth, self.n_bins))

    def meta(self) -> dict:
        return {**super().meta(), "n_bins": self.n_bins, "min_depth": self.min_depth, "max_depth": self.max_depth}

    @classmethod
    def from_meta(cls, meta: dict) -> DepthProbe:
        return cls(int(meta["channels"]), int(meta["n_bins"]), float(meta["min_depth"]), float(meta["max_depth"]))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, n_bins, h, w]``: the linearly normalised bin scores."""
        s = torch.relu(self.scores(features)) + NORM_EPS
        return s / s.sum(dim=1, keepdim=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Depth on the tap's grid, ``[B, h, w]`` metres."""
        return torch.einsum("bkhw,k->bhw", self.probabilities(features), self.centres)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Depth at ``size`` (H, W): bilinear upsampling of the grid prediction, clipped to the bins' range."""
        d = F.interpolate(self(features)[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return d.clamp(self.min_depth, self.max_depth)

    def _bins(self, depth: np.ndarray) -> np.ndarray:
        scale = (self.n_bins - 1) / (self.max_depth - self.min_depth)
        return np.clip(np.rint((depth - self.min_depth) * scale), 0, self.n_bins - 1).astype(np.int64)

    def prepare(self, target: np.ndarray, grid: tuple[int, int]) -> dict:
        """What the loss needs of one ground-truth map that does not change during training."""
        gt = np.asarray(target, dtype=np.float32)
        keep = (gt > self.min_depth) & (gt <= self.max_depth)
        index, count = sparse_counts(self._bins(gt), keep, grid, self.n_bins)
        return {"gt": target, "keep": torch.from_numpy(keep), "index": index, "cell": index % (grid[0] * grid[1]),
                "count": count}

    def _loss(self, features: torch.Tensor, prepared: Sequence[dict]) -> torch.Tensor:
        """``CE + SI-log`` over the valid pixels (module docstring)."""
        r = torch.relu(self.scores(features)) + NORM_EPS  # [B, K, h, w]
        total = r.sum(dim=1)  # [B, h, w]
        depth = torch.einsum("bkhw,k->bhw", r, self.centres) / total
        ce_sum, ce_count = r.new_zeros(()), 0.0
        g_sum, g_sq, n = r.new_zeros(()), r.new_zeros(()), 0.0
        for b, t in enumerate(prepared):
            if not len(t["count"]):
                continue
            # log p at the ground truth's (bin, cell) pairs only: log r - log sum_k r
            log_p = r[b].reshape(-1)[t["index"]].log() - total[b].reshape(-1)[t["cell"]].log()
            ce_sum = ce_sum - (t["count"] * log_p).sum()
            ce_count += float(t["count"].sum())
            gt = torch.from_numpy(np.array(t["gt"], dtype=np.float32))
            keep = t["keep"].float()
            up = resize_matrix(gt.shape[0], depth.shape[1]) @ depth[b] @ resize_matrix(gt.shape[1], depth.shape[2]).T
            g = (torch.log(up.clamp_min(0) + SILOG_EPS) - torch.log(gt + SILOG_EPS)) * keep
            g_sum, g_sq, n = g_sum + g.sum(), g_sq + (g * g).sum(), n + float(keep.sum())
        if not n:
            return r.sum() * 0.0  # no valid pixel in this batch: no gradient, no NaN
        mean = g_sum / n
        silog = torch.sqrt((g_sq / n - mean * mean).clamp_min(0) + SILOG_LAMBDA * mean * mean + 1e-12)
        return ce_sum / ce_count + silog

    @torch.no_grad()
    def evaluate(self, features: Sequence, depths: Sequence[np.ndarray], protocol: DepthProtocol) -> dict:
        """Per-image metrics averaged over images (``images`` counts those with a valid pixel)."""
        rows = []
        for f, gt in zip(features, depths):
            gt = np.asarray(gt, dtype=np.float32)
            pred = self.predict(torch.from_numpy(np.array(f, dtype=np.float32))[None], gt.shape)[0].numpy()
            m = depth_metrics(pred, gt, protocol.valid(gt))
            if m is not None:
                rows.append(m)
        if not rows:
            raise ValueError("no test image has a valid ground-truth pixel under this protocol (check --max-depth)")
        out = {k: float(np.mean([r[k] for r in rows])) for k in ("rmse", "abs_rel", "delta1")}
        out["images"] = len(rows)
        return out
