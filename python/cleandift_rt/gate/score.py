"""The content-shift score (GATE paper section 5.2), with the formula written out in full.

The paper compares the contours of a feature with those of a reference feature extracted at t = 0
(least affected by noise) through the Laplacian, and normalises by an anchor with strong content
shift. Our copy's equations are partly illegible; this is the formula we use (docs/gate.md says why):

    N(F)        = F / ||F||_2 over channels, per pixel            (features are used through cosines)
    E(F)[i, j]  = || Laplacian(N(F))[:, i, j] ||_2                (3 x 3 kernel per channel, replicated border)
    diff(F)     = sum_ij | E(F_ref)[i, j] - E(F)[i, j] |
    score(F)    = (diff(F_anchor) - diff(F)) / diff(F_anchor)  =  1 - diff(F) / diff(F_anchor)

so the score is 1 for a feature whose contours match the reference exactly, 0 for the anchor, below
0 for more shift than the anchor, and it falls as the contours drift further from the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
_EPS = 1e-12


def _as_map(x, what: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"{what} must be a C x h x w (or 1 x C x h x w) feature map, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{what} must be floating point, got {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf")
    if min(t.shape[1:]) < 3:
        raise ValueError(f"{what} is {t.shape[1]} x {t.shape[2]} pixels: the 3 x 3 Laplacian needs at least 3 x 3")
    return t


def edge_strength(feature) -> torch.Tensor:
    """``h x w``: the L2 norm over channels of the Laplacian of the per-pixel normalised feature."""
    f = _as_map(feature, "feature")
    f = f / f.norm(dim=0, keepdim=True).clamp_min(_EPS)
    kernel = _LAPLACIAN.expand(f.shape[0], 1, 3, 3)
    lap = F.conv2d(F.pad(f[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=f.shape[0])[0]
    return lap.norm(dim=0)


def laplacian_difference(feature, reference) -> float:
    """``diff``: summed absolute difference of the edge strengths of ``feature`` and ``reference``."""
    f, r = _as_map(feature, "feature"), _as_map(reference, "reference")
    if f.shape != r.shape:
        raise ValueError(f"feature {tuple(f.shape)} and reference {tuple(r.shape)} differ in shape: extract both at "
                         "the same size and grid")
    return float((edge_strength(r) - edge_strength(f)).abs().sum())


def content_shift_score(feature, reference, anchor) -> float:
    """1 - diff(feature) / diff(anchor), both against ``reference`` (module docstring): 1 = no content
    shift, 0 = as much as the anchor, < 0 = more."""
    diff_anchor = laplacian_difference(anchor, reference)
    if diff_anchor <= _EPS:
        raise ValueError("the anchor's contours equal the reference's: pick an anchor with content shift (e.g. the "
                         "plain noisy baseline, or a larger timestep)")
    return 1.0 - laplacian_difference(feature, reference) / diff_anchor
