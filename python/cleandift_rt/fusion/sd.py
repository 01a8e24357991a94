"""The Stable Diffusion side of the fusion recipes: the CleanDIFT student's taps us2, us5, us8 (the inputs
of ldm output blocks 2, 5, 8; docs/method.md, zero-shot fusion) on the square canvas, through any ``Engine``.

The canvas (960 px by default) goes through the engine either in one pass or, as the original
does, as 2 x 2 overlapping square crops (512 px by default, offsets 0 and ``size - crop`` on each
axis) whose tap maps are placed on the canvas grid and averaged where they overlap. Tap maps come
back at the engine's own size; when it differs from the crop (a fixed-size export), they are
resized bilinearly to the grid the crop covers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..taps import TAP_TABLE

SD_TAPS = ("us8", "us5", "us2")  # descriptor order: ldm output blocks 8, 5, 2 (the references' s3, s4, s5)
GRID_MULTIPLE = 64  # the coarsest tap (us2) has stride 64: crops and offsets must land on its cells


class SdTaps:
    """Taps ``SD_TAPS`` of square canvases through ``engine`` (anything with ``Engine.extract``).

    Args:
        engine: the CleanDIFT engine; its file must contain taps us2, us5 and us8.
        size: canvas side (multiple of 64; the recipes use 960).
        crop: side of the 2 x 2 overlapping crops, or None for one pass over the whole canvas.
        prompts: ``category -> prompt embeddings`` (``[L, D]``) or None for the engine's baked prompt.
    """

    def __init__(self, engine, size: int = 960, crop: int | None = 512,
                 prompts: Callable[[str | None], torch.Tensor | None] | None = None):
        missing = [t for t in SD_TAPS if t not in getattr(engine, "taps", SD_TAPS)]
        if missing:
            raise ValueError(f"the engine file has no tap(s) {', '.join(missing)} (it has {', '.join(engine.taps)}); "
                             "the fusion recipes need us2, us5 and us8: re-export with --taps us2 us5 us8 (or all taps)")
        for name, value in (("size", size), ("crop", crop)):
            if value is not None and (int(value) <= 0 or int(value) % GRID_MULTIPLE):
                raise ValueError(f"SD {name} {value} must be a positive multiple of {GRID_MULTIPLE}")
        if crop is not None and crop > size:
            raise ValueError(f"SD crop {crop} is larger than the canvas {size}")
        self.engine, self.size = engine, int(size)
        self.crop = None if crop is None or crop == size else int(crop)
        self.prompts = prompts

    def describe(self) -> dict:
        passes = "one pass" if self.crop is None else f"2 x 2 overlapping {self.crop} px crops, overlaps averaged"
        return {"taps": list(SD_TAPS), "canvas": self.size, "passes": passes,
                "engine_size": list(getattr(self.engine, "size", [])) or None}

    def _run(self, pixels: torch.Tensor, category: str | None) -> dict[str, torch.Tensor]:
        embeds = self.prompts(category) if self.prompts is not None else None
        if embeds is not None and embeds.ndim == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]  # one prompt shared by the crops of the batch
        kwargs = {} if embeds is None else {"prompt_embeds": embeds}
        out = self.engine.extract(pixels, taps=list(SD_TAPS), **kwargs)
        return {t: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).float().cpu()
                for t, v in out.items()}

    @staticmethod
    def _at_grid(x: torch.Tensor, side: int) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (side, side):
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def canvas_taps(self, canvas: torch.Tensor, category: str | None = None) -> list[dict[str, torch.Tensor]]:
        """``B x 3 x size x size`` canvases in [0, 1] -> per image ``{tap: [C, size/stride, size/stride]}``."""
        if canvas.ndim != 4 or tuple(canvas.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"canvases must be B x 3 x {self.size} x {self.size}, got {tuple(canvas.shape)}")
        pixels = canvas.float() * 2 - 1
        if self.crop is None:
            feats = self._run(pixels, category)
            return [{t: self._at_grid(feats[t], self.size // TAP_TABLE[t].stride)[i] for t in SD_TAPS}
                    for i in range(len(canvas))]
        starts = (0, self.size - self.crop)
        windows = [(y, x) for y in starts for x in starts]
        out = []
        for image in pixels:
            crops = torch.stack([image[:, y:y + self.crop, x:x + self.crop] for y, x in windows])
            feats = self._run(crops, category)
            maps = {}
            for t in SD_TAPS:
                stride = TAP_TABLE[t].stride
                side, cell = self.size // stride, self.crop // stride
                tiles = self._at_grid(feats[t], cell)
                acc = torch.zeros(tiles.shape[1], side, side)
                count = torch.zeros(1, side, side)
                for tile, (y, x) in zip(tiles, windows):
                    acc[:, y // stride:y // stride + cell, x // stride:x // stride + cell] += tile
                    count[:, y // stride:y // stride + cell, x // stride:x // stride + cell] += 1
                maps[t] = acc / count
            out.append(maps)
        return out
