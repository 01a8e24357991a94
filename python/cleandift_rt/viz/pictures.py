"""Pictures a person reads at a glance, drawn with Pillow only (no matplotlib in the library).

- :func:`draw_matches`: two images side by side, one coloured line per match (colour = cosine
  similarity on a viridis ramp, most confident drawn on top), a title and a legend with the scale.
- :func:`feature_pca`: each image above its feature PCA: the first principal component,
  thresholded at its mean, separates foreground from background (background drawn dark); the next
  three components are shown as RGB on the foreground.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PCA_BACKGROUND = (40, 40, 40)
# viridis at 0, 0.25, 0.5, 0.75, 1: readable on photos and for colour-blind readers
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values) -> list[tuple[int, int, int]]:
    """Values in [0, 1] -> RGB tuples on the viridis ramp (low = purple, high = yellow)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[:, None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return [tuple(int(round(c)) for c in row) for row in rgb]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"pictures take PIL images or uint8 H x W x 3 arrays, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def _fit_height(image: Image.Image, height: int) -> tuple[Image.Image, float]:
    scale = height / image.height
    return image.resize((max(1, round(image.width * scale)), height), Image.BICUBIC), scale


def _points(points, what: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    if not np.isfinite(p).all():
        raise ValueError(f"{what} contain NaN or Inf")
    return p


def _text_block(draw: ImageDraw.ImageDraw, xy, lines: Sequence[str], font) -> None:
    x, y = xy
    for line in lines:
        draw.text((x, y), line, fill=TEXT, font=font)
        y += font.size + 4 if hasattr(font, "size") else 14


def draw_matches(image_a, image_b, points_a, points_b, scores=None, *, max_lines: int = 60, height: int = 384,
                 title: str | None = None, note: str | None = None) -> Image.Image:
    """Side-by-side picture of matches ``points_a[i] <-> points_b[i]`` (x, y in each original image).

    ``scores`` (e.g. cosine similarities) order the matches: the ``max_lines`` most confident are
    drawn, coloured by score, the best on top. Without scores all are drawn in one colour per index.
    """
    a, b = _as_pil(image_a), _as_pil(image_b)
    pa, pb = _points(points_a, "points_a"), _points(points_b, "points_b")
    if len(pa) != len(pb):
        raise ValueError(f"{len(pa)} points in image A but {len(pb)} in image B: matches come in pairs")
    if max_lines < 1:
        raise ValueError("max_lines must be >= 1")
    n_total = len(pa)
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(s) != n_total:
            raise ValueError(f"{len(s)} scores for {n_total} matches")
        order = np.argsort(-s, kind="stable")[:max_lines]
    else:
        s = None
        order = np.arange(min(n_total, max_lines))
    font, small = _font(16), _font(13)
    gap, pad, title_h, legend_h = 12, 10, 30, 58
    ra, sa = _fit_height(a, height)
    rb, sb = _fit_height(b, height)
    width = max(ra.width + gap + rb.width + 2 * pad, 520)
    canvas = Image.new("RGB", (width, title_h + height + legend_h + 2 * pad), BACKGROUND)
    top = title_h + pad
    xb = pad + ra.width + gap
    canvas.paste(ra, (pad, top))
    canvas.paste(rb, (xb, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 7), title or "matches", fill=TEXT, font=font)

    if s is not None and len(order):
        lo, hi = float(s[order].min()), float(s[order].max())
        span = hi - lo if hi > lo else 1.0
        colours = dict(zip(order.tolist(), colormap((s[order] - lo) / span)))
    else:
        lo = hi = None
        hues = [Image.new("HSV", (1, 1), (int(255 * i / max(1, len(order))), 220, 230)).convert("RGB").getpixel((0, 0))
                for i in range(len(order))]
        colours = dict(zip(order.tolist(), hues))
    for i in order[::-1]:  # least confident first, so the most confident lines end up on top
        x0, y0 = pad + pa[i, 0] * sa, top + pa[i, 1] * sa
        x1, y1 = xb + pb[i, 0] * sb, top + pb[i, 1] * sb
        c = colours[int(i)]
        draw.line([(x0, y0), (x1, y1)], fill=c, width=2)
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c, outline=(255, 255, 255))

    ly = top + height + pad
    shown = f"{len(order)} of {n_total} matches shown" + (", most confident first" if s is not None else "")
    lines = [shown + (f"; {note}" if note else "")]
    if lo is not None:
        bar_w, bar_x = 200, width - pad - 200
        ramp = colormap(np.linspace(0, 1, bar_w))
        for k, c in enumerate(ramp):
            draw.line([(bar_x + k, ly), (bar_x + k, ly + 12)], fill=c)
        draw.text((bar_x, ly + 16), f"{lo:.3f}", fill=TEXT, font=small)
        draw.text((bar_x + bar_w - 40, ly + 16), f"{hi:.3f}", fill=TEXT, font=small)
        draw.text((bar_x + 55, ly + 32), "cosine similarity", fill=TEXT, font=small)
    _text_block(draw, (pad, ly), lines + ["left: image A, right: image B; line = A point -> its match in B"], small)
    return canvas


def _pca_basis(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-``k`` principal directions (columns) of the rows of ``x``, by an exact eigendecomposition."""
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    vals, vecs = torch.linalg.eigh(cov)
    order = torch.argsort(vals, descending=True)[:k]
    vecs = vecs[:, order]
    # eigenvectors have no sign: fix it (largest-magnitude entry positive) so pictures are reproducible
    signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(vecs.shape[1])])
    return mean, vecs * torch.where(signs == 0, 1.0, signs)


def pca_maps(features: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each ``[C, h, w]`` map: (foreground mask ``[h, w]`` bool, RGB ``[h, w, 3]`` float in [0, 1]).

    One PCA over the pixels of all maps together, so colours are comparable across images.
    """
    maps = [torch.as_tensor(np.asarray(f) if not isinstance(f, torch.Tensor) else f).detach().double().cpu()
            for f in features]
    if not maps:
        raise ValueError("feature_pca needs at least one feature map")
    for m in maps:
        if m.ndim != 3:
            raise ValueError(f"feature maps must be [C, h, w], got shape {tuple(m.shape)}")
        if m.shape[0] != maps[0].shape[0]:
            raise ValueError("all feature maps must have the same number of channels")
        if not torch.isfinite(m).all():
            raise ValueError("feature maps contain NaN or Inf")
    pixels = torch.cat([m.flatten(1).T for m in maps])
    pixels = torch.nn.functional.normalize(pixels, dim=1)  # cosine geometry, as matching uses
    k = min(4, pixels.shape[1])
    mean, basis = _pca_basis(pixels, k)
    proj = (pixels - mean) @ basis
    first = proj[:, 0]
    border = torch.cat([_border_mask(m.shape[1], m.shape[2]) for m in maps])
    if (~border).any() and first[border].mean() > first[~border].mean():
        first = -first  # the object is rarely what touches the image border: make it the positive side
    fg = first > 0
    if fg.sum() < 3 or fg.all():
        fg = torch.ones_like(fg)
    rgb = torch.zeros(pixels.shape[0], 3, dtype=torch.float64)
    comps = proj[:, 1:4] if k >= 4 else proj[:, :3]
    lo = torch.quantile(comps[fg], 0.02, dim=0)
    hi = torch.quantile(comps[fg], 0.98, dim=0)
    rgb[:, : comps.shape[1]] = ((comps - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).clamp(0, 1)
    out, start = [], 0
    for m in maps:
        n = m.shape[1] * m.shape[2]
        out.append((fg[start:start + n].reshape(m.shape[1:]).numpy(), rgb[start:start + n].reshape(*m.shape[1:], 3).numpy()))
        start += n
    return out


def _border_mask(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m.flatten()


def feature_pca(features: Sequence, images: Sequence, *, height: int = 256, title: str | None = None) -> Image.Image:
    """Each image above its feature PCA picture (see the module docstring); one shared PCA."""
    if len(features) != len(images):
        raise ValueError(f"{len(features)} feature maps for {len(images)} images")
    maps = pca_maps(features)
    font, small = _font(16), _font(13)
    pad, gap, title_h, legend_h = 10, 10, 30, 40
    tiles = []
    for img, (fg, rgb) in zip(images, maps):
        photo, _ = _fit_height(_as_pil(img), height)
        colour = (rgb * 255).round().astype(np.uint8)
        colour[~fg] = PCA_BACKGROUND
        pca = Image.fromarray(colour).resize(photo.size, Image.NEAREST)  # nearest: shows the true feature grid
        tiles.append((photo, pca))
    width = max(sum(p.width for p, _ in tiles) + gap * (len(tiles) - 1) + 2 * pad, 420)
    canvas = Image.new("RGB", (width, title_h + 2 * height + gap + legend_h + 2 * pad), BACKGROUND)
    x = pad
    for photo, pca in tiles:
        canvas.paste(photo, (x, title_h + pad))
        canvas.paste(pca, (x, title_h + pad + height + gap))
        x += photo.width + gap
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 7), title or "feature PCA", fill=TEXT, font=font)
    _text_block(draw, (pad, title_h + pad + 2 * height + gap + 6),
                ["bottom: principal component 1 > mean = foreground (background dark); components 2, 3, 4 as R, G, B",
                 "one PCA over all images: the same colour means similar features"], small)
    return canvas
