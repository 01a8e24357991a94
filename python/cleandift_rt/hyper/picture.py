"""The learned mixing weights as a layers x timesteps heat map (the method's interpretability, docs/method.md, Diffusion Hyperfeatures).

Rows are the aggregated layers (top: the first), columns the timesteps of the source (left: the
smallest), each cell coloured by its softmax weight on the viridis ramp from the smallest weight
(purple) to the largest (yellow) and labelled with it in percent; a legend gives the scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..viz.pictures import BACKGROUND, TEXT, _font, colormap

CELL = 44
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM, MARGIN_RIGHT = 64, 40, 48, 16
LEGEND_HEIGHT = 14
MIN_WIDTH = 360  # room for the title when there are few timesteps


def heatmap_size(layers: int, timesteps: int) -> tuple[int, int]:
    """(width, height) in pixels of :func:`mixing_weights_picture` for an L x S grid."""
    return (max(MIN_WIDTH, MARGIN_LEFT + timesteps * CELL + MARGIN_RIGHT),
            MARGIN_TOP + layers * CELL + MARGIN_BOTTOM + LEGEND_HEIGHT + 16)


def _label(t: float) -> str:
    return f"{t:g}"


def mixing_weights_picture(weights, layers: Sequence[str], timesteps: Sequence[float], title: str = "") -> Image.Image:
    """Heat map of ``weights [L, S]`` (rows ``layers``, columns ``timesteps``)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape != (len(layers), len(timesteps)):
        raise ValueError(f"weights must be [layers={len(layers)}, timesteps={len(timesteps)}], got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("mixing weights contain NaN or Inf")
    n_layers, n_times = w.shape
    lo, hi = float(w.min()), float(w.max())
    scaled = (w - lo) / (hi - lo) if hi > lo else np.full_like(w, 0.5)
    colours = colormap(scaled.ravel())
    width, height = heatmap_size(n_layers, n_times)
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(10)
    draw.text((8, 10), title or "mixing weights (softmax over layers x timesteps)", fill=TEXT, font=font)
    for i in range(n_layers):
        y = MARGIN_TOP + i * CELL
        draw.text((8, y + CELL // 2 - 7), str(layers[i]), fill=TEXT, font=font)
        for j in range(n_times):
            x = MARGIN_LEFT + j * CELL
            colour = colours[i * n_times + j]
            draw.rectangle([x, y, x + CELL - 2, y + CELL - 2], fill=colour)
            ink = (0, 0, 0) if scaled[i, j] > 0.6 else (255, 255, 255)
            draw.text((x + 4, y + CELL // 2 - 6), f"{100 * w[i, j]:.1f}", fill=ink, font=small)
    bottom = MARGIN_TOP + n_layers * CELL
    for j, t in enumerate(timesteps):
        draw.text((MARGIN_LEFT + j * CELL + 4, bottom + 4), _label(float(t)), fill=TEXT, font=small)
    draw.text((MARGIN_LEFT, bottom + 20), "timestep", fill=TEXT, font=small)
    legend_top = bottom + MARGIN_BOTTOM - 8
    ramp = colormap(np.linspace(0, 1, n_times * CELL))
    for k, colour in enumerate(ramp):
        draw.line([(MARGIN_LEFT + k, legend_top), (MARGIN_LEFT + k, legend_top + LEGEND_HEIGHT)], fill=colour)
    draw.text((MARGIN_LEFT, legend_top + LEGEND_HEIGHT + 2), f"{100 * lo:.2f}%", fill=TEXT, font=small)
    right = f"{100 * hi:.2f}%"
    draw.text((MARGIN_LEFT + n_times * CELL - 6 * len(right), legend_top + LEGEND_HEIGHT + 2), right, fill=TEXT,
              font=small)
    return img
