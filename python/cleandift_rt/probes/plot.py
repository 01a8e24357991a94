"""Pictures of the probes, drawn with Pillow: the sweep line plot, depth panels, segmentation overlays.

:func:`line_plot` is a small general helper (lines with markers, dashed horizontal reference lines,
nice ticks, a legend); the sweep plot of the paper's figures 6, 9, 10 and 15 is one call of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..viz.pictures import colormap

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
INK, GRID, WHITE = (25, 25, 25), (225, 225, 225), (255, 255, 255)
_VIRIDIS_LUT = np.array(colormap(np.linspace(0, 1, 256)), dtype=np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 10))
    return ticks


def _label(v: float) -> str:
    return f"{v:.4g}"


def line_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
              hlines: Sequence[tuple[str, float]] = (), *, title: str = "", xlabel: str = "", ylabel: str = "",
              size: tuple[int, int] = (900, 540)) -> Image.Image:
    """``series``: (label, xs, ys) lines with markers; ``hlines``: (label, y) dashed lines across the plot."""
    series = [(name, list(map(float, xs)), list(map(float, ys))) for name, xs, ys in series]
    for name, xs, ys in series:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"series {name!r}: need as many x as y values, at least one")
    if not series and not hlines:
        raise ValueError("line_plot needs at least one series or horizontal line")
    xs_all = [x for _, xs, _ in series for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys in series for y in ys if math.isfinite(y)] + [y for _, y in hlines if math.isfinite(y)]
    ys_all = ys_all or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs_all), max(xs_all)), nice_ticks(min(ys_all), max(ys_all))
    width, height = size
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    font, small = _font(18), _font(14)
    left, right, top, bottom = 80, width - 230, 50, height - 60

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - xt[0]) / (xt[-1] - xt[0])
        fy = (y - yt[0]) / (yt[-1] - yt[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for v in yt:
        _, y = px(xt[0], v)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((left - 8, y), _label(v), fill=INK, font=small, anchor="rm")
    for v in xt:
        x, _ = px(v, yt[0])
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x, bottom + 8), _label(v), fill=INK, font=small, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, 12), title, fill=INK, font=font, anchor="ma")
    draw.text(((left + right) / 2, height - 22), xlabel, fill=INK, font=small, anchor="ma")
    draw.text((left, top - 8), ylabel, fill=INK, font=small, anchor="ld")

    legend = []
    for i, (name, xs, ys) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = [px(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        legend.append((name, colour, False))
    for j, (name, value) in enumerate(hlines):
        colour = COLOURS[(len(series) + j) % len(COLOURS)]
        if math.isfinite(value):
            _, y = px(xt[0], value)
            for x0 in range(left, right, 16):
                draw.line([(x0, y), (min(x0 + 9, right), y)], fill=colour, width=3)
        legend.append((name, colour, True))
    ly = top + 10
    for name, colour, dashed in legend:
        if dashed:
            draw.line([(right + 15, ly + 8), (right + 25, ly + 8)], fill=colour, width=3)
            draw.line([(right + 31, ly + 8), (right + 41, ly + 8)], fill=colour, width=3)
        else:
            draw.line([(right + 15, ly + 8), (right + 41, ly + 8)], fill=colour, width=3)
            draw.ellipse([right + 24, ly + 4, right + 32, ly + 12], fill=colour)
        draw.text((right + 50, ly + 8), name, fill=INK, font=small, anchor="lm")
        ly += 26
    return img


def depth_colours(depth: np.ndarray, max_depth: float, valid: np.ndarray | None = None) -> Image.Image:
    """Depth on the viridis ramp over [0, max_depth]; pixels not ``valid`` drawn black."""
    levels = np.clip(np.asarray(depth, dtype=np.float64) / max_depth, 0, 1)
    rgb = _VIRIDIS_LUT[np.rint(levels * 255).astype(np.int64)]
    if valid is not None:
        rgb[~np.asarray(valid)] = 0
    return Image.fromarray(rgb)


def _row(tiles: Sequence[Image.Image], height: int) -> Image.Image:
    tiles = [t.resize((max(1, round(t.width * height / t.height)), height), Image.BILINEAR) for t in tiles]
    row = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), height), WHITE)
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + 8
    return row


def panel(rows: Sequence[Sequence[Image.Image]], headings: Sequence[str], height: int = 192) -> Image.Image:
    """Rows of same-size tiles under one line of column headings."""
    built = [_row(r, height) for r in rows]
    width = max(r.width for r in built)
    out = Image.new("RGB", (width, 30 + sum(r.height + 8 for r in built)), WHITE)
    draw = ImageDraw.Draw(out)
    tile_w = built[0].width / max(1, len(rows[0]))
    for i, h in enumerate(headings):
        draw.text((i * tile_w + tile_w / 2, 8), h, fill=INK, font=_font(16), anchor="ma")
    y = 30
    for r in built:
        out.paste(r, (0, y))
        y += r.height + 8
    return out


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (``[n, 3]`` uint8): class i's colour in the devkit's label PNGs."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        pal[i] = rgb
    return pal


def overlay(image, labels: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``labels`` (class indices, 255 = void) in VOC colours blended over ``image`` (resized to the labels)."""
    labels = np.asarray(labels)
    base = np.asarray(Image.fromarray(np.asarray(image)).convert("RGB").resize(labels.shape[::-1], Image.BILINEAR),
                      dtype=np.float64)
    colours = voc_palette()[labels.astype(np.int64)].astype(np.float64)
    return Image.fromarray(np.clip((1 - alpha) * base + alpha * colours, 0, 255).astype(np.uint8))
