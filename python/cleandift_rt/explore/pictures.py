"""The explorer's pictures: a heat map and a PCA picture per image, drawn at overlay size straight from
the descriptor grid (each overlay pixel looks up the grid through the image's ``GridMap``, so the
pad / canvas borders and the size policy need no special case), encoded as PNG data URLs.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..viz.pictures import PCA_BACKGROUND, colormap, pca_maps

OVERLAY_SIDE = 256  # long side of a heat map / PCA picture: the browser scales it to the photo
# viridis as a 256-entry table (low purple, high yellow), the ramp of the package's match pictures
_LUT = np.array(colormap(np.linspace(0.0, 1.0, 256)), dtype=np.uint8)


def overlay_size(width: int, height: int, side: int = OVERLAY_SIDE) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _cells(grid, width: int, height: int, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Grid coordinates ``[oh, ow, 2]`` of the overlay pixels' centres, and the overlay size (w, h)."""
    ow, oh = overlay_size(width, height, side)
    xs = (np.arange(ow) + 0.5) * width / ow - 0.5
    ys = (np.arange(oh) + 0.5) * height / oh - 0.5
    points = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    return grid.to_grid(points).reshape(oh, ow, 2), (ow, oh)


def data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # speed over size: it travels over loopback
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_picture(heat: torch.Tensor, grid, width: int, height: int, side: int = OVERLAY_SIDE) -> tuple[Image.Image, float, float]:
    """The ``[h, w]`` similarity map over a ``width x height`` image, bilinear between cell centres,
    stretched from its lowest to its highest value on the image (viridis). Returns (picture, low, high)."""
    cells, (ow, oh) = _cells(grid, width, height, side)
    h, w = heat.shape
    norm = torch.as_tensor(cells, dtype=torch.float32) / torch.tensor([max(w - 1, 1), max(h - 1, 1)]) * 2 - 1
    sampled = F.grid_sample(heat.float()[None, None], norm[None], mode="bilinear", padding_mode="border",
                            align_corners=True)[0, 0].numpy()
    low, high = float(sampled.min()), float(sampled.max())
    scaled = (sampled - low) / (high - low) if high > low else np.zeros_like(sampled)
    return Image.fromarray(_LUT[np.round(scaled * 255).astype(np.intp)]), low, high


def content_crop(feature_map: torch.Tensor, grid, width: int, height: int):
    """The cells of a ``[C, h, w]`` map whose centres lie on the image (not on padding) and the GridMap
    of the cropped grid: the PCA is then the image's, not the padding's."""
    h, w = feature_map.shape[-2:]
    (x0, y0), (x1, y1) = grid.to_grid([[-0.5, -0.5], [width - 0.5, height - 0.5]])
    cx0, cy0 = max(0, int(np.ceil(x0))), max(0, int(np.ceil(y0)))
    cx1, cy1 = min(w, int(np.floor(x1)) + 1), min(h, int(np.floor(y1)) + 1)
    if cx1 <= cx0 or cy1 <= cy0:  # an image smaller than one cell: keep the cell under it
        cx0, cy0 = min(max(0, int(round(x0))), w - 1), min(max(0, int(round(y0))), h - 1)
        cx1, cy1 = cx0 + 1, cy0 + 1
    return feature_map[:, cy0:cy1, cx0:cx1], grid.shifted(cx0, cy0)


def pca_pictures(maps, sizes, side: int = OVERLAY_SIDE) -> list[Image.Image]:
    """One PCA over the image content of all ``(map, GridMap)`` pairs (``viz.pca_maps``: component 1
    splits foreground from background, drawn dark; components 2-4 as RGB), each drawn over its image
    (``sizes``: (width, height)) with the nearest cell's colour: the true feature grid shows."""
    cropped = [content_crop(m, g, w, h) for (m, g), (w, h) in zip(maps, sizes)]
    pictures = []
    for (fg, rgb), (crop, grid), (width, height) in zip(pca_maps([c for c, _ in cropped]), cropped, sizes):
        colour = (rgb * 255).round().astype(np.uint8)
        colour[~fg] = PCA_BACKGROUND
        cells, _ = _cells(grid, width, height, side)
        ix = np.clip(np.round(cells[..., 0]).astype(np.intp), 0, crop.shape[-1] - 1)
        iy = np.clip(np.round(cells[..., 1]).astype(np.intp), 0, crop.shape[-2] - 1)
        pictures.append(Image.fromarray(colour[iy, ix]))
    return pictures
