"""``Fusion``: one object that extracts the raw maps of a batch (SD taps through an Engine, DINOv2),
fuses them into descriptor maps by a recipe, and matches them (argmax, window soft-argmax, adaptive flip).

Coordinates: both canvases are the same centred square of the image, so one descriptor grid of
``g x g`` cells covers the descriptor canvas (DINO's, or SD's without DINO). A source keypoint takes
the cell under it (``floor(x * g / size)``, as the references); a matched cell ``p`` (fractional
after the soft-argmax) sits at canvas pixel ``(p + 0.5) * size / g`` (``p * 14 + 7`` at 840 px),
mapped back to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.matching import match
from ..taps import TAP_TABLE
from ..kernels.refine import soft_argmax
from .canvas import Placement, flip_images, placement, square_canvas
from .flip import box_mask, feature_foregrounds, fit_distance, flipped_source_points, mirrored_box
from .recipes import Recipe, fuse
from .sd import SdTaps


@dataclass
class Transfer:
    """Predicted target points of one pair, and what the adaptive flip decided."""

    points: np.ndarray  # [N, 2] x, y in the original target image
    similarity: np.ndarray  # [N] cosine similarity of each match's argmax cell
    flipped: bool | None = None  # None: flip off, or not applicable to this pair (no keypoint ids / unknown category)
    fit: tuple[float, float] | None = None  # (original, flipped) source-to-target feature distance
    masks: str | None = None  # where the objects for the fit came from: "bbox", "features" or both


class Fusion:
    """Fused SD + DINOv2 descriptors and matching by one recipe.

    Args:
        recipe: a :class:`recipes.Recipe` (``RECIPES["tlfr"]``, ...).
        engine: the CleanDIFT ``Engine`` (taps us2, us5, us8).
        dino: a ``Dinov2Features`` at ``recipe.dino_size`` (not needed when ``recipe.dino`` is off).
        prompts: ``category -> prompt embeddings`` or None (the engine's baked prompt).
    """

    def __init__(self, recipe: Recipe, engine, dino=None, prompts=None):
        self.recipe = recipe
        self.sd = SdTaps(engine, recipe.sd_size, recipe.sd_crop, prompts)
        if recipe.dino:
            if dino is None:
                raise ValueError(f"recipe {recipe.name} fuses DINOv2 features: pass the DINOv2 weights (--dino PATH), "
                                 "or switch DINO off (--no-dino)")
            if dino.size != recipe.dino_size:
                raise ValueError(f"the DINOv2 features run at {dino.size} px but the recipe wants {recipe.dino_size}")
        self.dino = dino if recipe.dino else None
        self.canvas_size = recipe.dino_size if recipe.dino else recipe.sd_size
        self.grid = dino.grid if self.dino is not None else recipe.sd_size // TAP_TABLE["us8"].stride

    # -- raw maps and descriptors --------------------------------------------------------------

    def sd_raw(self, images, category: str | None = None) -> list[dict]:
        """Per image ``{"us8", "us5", "us2": [C, h, w]}`` on the SD canvas."""
        canvas, _ = square_canvas(images, self.recipe.sd_size)
        return self.sd.canvas_taps(canvas, category)

    def dino_raw(self, images) -> list[dict]:
        """Per image ``{"dino": [C, g, g]}`` on the DINO canvas."""
        canvas, _ = square_canvas(images, self.dino.size)
        return [{"dino": d} for d in self.dino.canvas_features(canvas)]

    def raw(self, images, category: str | None = None) -> list[dict]:
        """Per image ``{"us8", "us5", "us2"[, "dino"]: [C, h, w]}`` (the expensive part; cache it)."""
        maps = self.sd_raw(images, category)
        if self.dino is not None:
            for m, d in zip(maps, self.dino_raw(images)):
                m.update(d)
        return maps

    def descriptors(self, raws: list[dict]) -> list[torch.Tensor]:
        """``[D, g, g]`` descriptor maps of raw maps (a pair shares ``tale``'s PCA)."""
        return fuse(self.recipe, raws)

    def placement(self, width: int, height: int) -> Placement:
        return placement(width, height, self.canvas_size)

    # -- matching ------------------------------------------------------------------------------

    def cells_of(self, place: Placement, points, grid: int) -> np.ndarray:
        """Integer cells ``[N, 2]`` (x, y) under original-image points."""
        c = np.floor(place.to_canvas(points) * grid / place.size).astype(np.int64)
        return np.clip(c, 0, grid - 1)

    def match_cells(self, source: torch.Tensor, target: torch.Tensor, cells: np.ndarray):
        """Target cells ``[N, 2]`` (float x, y) for source ``cells`` of ``[D, g, g]`` maps, and the
        cosine similarities ``[N]`` of the argmax cells."""
        rows = source[:, cells[:, 1], cells[:, 0]].T.contiguous()[None]
        index, sim = match(rows, target[None].contiguous())
        if self.recipe.refine:
            found = soft_argmax(rows, target[None], index, self.recipe.window, self.recipe.temperature, outside="zero")[0]
        else:
            grid = target.shape[-1]
            found = torch.stack([index[0] % grid, index[0] // grid], dim=-1).double()
        return found, sim[0].numpy()

    def to_image(self, place: Placement, cells: torch.Tensor, grid: int) -> np.ndarray:
        return place.from_canvas((cells.double().numpy() + 0.5) * place.size / grid)

    def transfer_raw(self, raw_source: dict, raw_target: dict, source_size, target_size, points, *,
                     raw_flipped: dict | None = None, category: str | None = None, keypoint_ids=None,
                     source_bbox=None, target_bbox=None) -> Transfer:
        """Transfer ``points`` (``[N, 2]`` original source pixels) from raw maps; ``*_size`` are (W, H).

        With the recipe's flip on and ``raw_flipped`` (the mirrored source's raw maps), the flipped
        predictions replace the original ones for keypoints visible with their left/right partner
        when the mirrored source fits the target better (:mod:`flip`).
        """
        src_desc, trg_desc = self.descriptors([raw_source, raw_target])
        grid = trg_desc.shape[-1]
        src_place, trg_place = self.placement(*source_size), self.placement(*target_size)
        pred_cells, sim = self.match_cells(src_desc, trg_desc, self.cells_of(src_place, points, grid))
        pred = self.to_image(trg_place, pred_cells, grid)
        if not self.recipe.flip or raw_flipped is None:
            return Transfer(pred, sim)
        flipped_points = flipped_source_points(points, keypoint_ids, source_size[0], category or "")
        if flipped_points is None:
            return Transfer(pred, sim)
        pts_f, use = flipped_points
        flip_desc, trg_desc_f = self.descriptors([raw_flipped, raw_target])
        masks = self._masks(src_desc, trg_desc, flip_desc, src_place, trg_place, source_size[0], source_bbox, target_bbox)
        fit = (fit_distance(src_desc, trg_desc, masks[0], masks[2]), fit_distance(flip_desc, trg_desc_f, masks[1], masks[2]))
        flipped = fit[1] < fit[0]
        if flipped:
            cells_f, sim_f = self.match_cells(flip_desc, trg_desc_f, self.cells_of(src_place, pts_f, grid))
            pred = np.where(use[:, None], self.to_image(trg_place, cells_f, grid), pred)
            sim = np.where(use, sim_f, sim)
        return Transfer(pred, sim, flipped, fit, masks[3])

    def _masks(self, src_desc, trg_desc, flip_desc, src_place, trg_place, width, source_bbox, target_bbox):
        """(source, flipped source, target) object masks on the grid, and where they came from."""
        grid = trg_desc.shape[-1]
        need_features = source_bbox is None or target_bbox is None
        # one PCA over the three views; each view's foreground is its own (the mirror's is not
        # assumed to be the mirrored source's: the crops and the canvas are not symmetric)
        fg = self._foregrounds([src_desc, flip_desc, trg_desc], [src_place, src_place, trg_place]) if need_features else None
        if source_bbox is not None:
            src = box_mask(source_bbox, src_place, grid)
            flip = box_mask(mirrored_box(source_bbox, width), src_place, grid)
        else:
            src, flip = fg[0], fg[1]
        trg = box_mask(target_bbox, trg_place, grid) if target_bbox is not None else fg[2]
        kinds = {"bbox" if source_bbox is not None else "features", "bbox" if target_bbox is not None else "features"}
        return src, flip, trg, "+".join(sorted(kinds))

    # -- whole images --------------------------------------------------------------------------

    def transfer(self, source_image, target_image, points, *, category: str | None = None, keypoint_ids=None,
                 source_bbox=None, target_bbox=None) -> Transfer:
        """``transfer_raw`` from two PIL images (extracting the mirrored source when the recipe flips)."""
        raw_src, raw_trg = self.raw([source_image, target_image], category)
        raw_flip = self.raw(flip_images([source_image]), category)[0] if self.recipe.flip else None
        return self.transfer_raw(raw_src, raw_trg, source_image.size, target_image.size, points, raw_flipped=raw_flip,
                                 category=category, keypoint_ids=keypoint_ids, source_bbox=source_bbox,
                                 target_bbox=target_bbox)

    def dense(self, source_image, target_image, category: str | None = None):
        """Mutual nearest neighbours between all descriptor cells of two PIL images.

        Returns ``(points_a, points_b, similarity, flipped)``: with the recipe's flip on and the
        mirrored source fitting better (feature foregrounds), the matches are the mirrored source's
        and ``points_a`` lie in the mirrored image.
        """
        raws = self.raw([source_image, target_image], category)
        src, trg = self.descriptors(raws)
        place_a, place_b = self.placement(*source_image.size), self.placement(*target_image.size)
        flipped = False
        if self.recipe.flip:
            flip_src, trg_f = self.descriptors([self.raw(flip_images([source_image]), category)[0], raws[1]])
            fg = self._foregrounds([src, flip_src, trg], [place_a, place_a, place_b])
            if fit_distance(flip_src, trg_f, fg[1], fg[2]) < fit_distance(src, trg, fg[0], fg[2]):
                src, trg, flipped = flip_src, trg_f, True
        grid = trg.shape[-1]
        cells_a, cells_b = self.content_cells(place_a, grid), self.content_cells(place_b, grid)  # not the padding
        rows_a = src.flatten(1).T[cells_a[:, 1] * grid + cells_a[:, 0]].contiguous()
        rows_b = trg.flatten(1).T[cells_b[:, 1] * grid + cells_b[:, 0]].contiguous()
        idx, sim = match(rows_a[None], rows_b[None], mutual=True)
        idx, sim = idx[0], sim[0]
        keep = torch.nonzero(idx >= 0)[:, 0]
        pa = self.to_image(place_a, cells_a[keep], grid)
        pb = self.to_image(place_b, cells_b[idx[keep]], grid)
        return pa, pb, sim[keep].numpy(), flipped

    @staticmethod
    def content_mask(place: Placement, grid: int) -> torch.Tensor:
        """``[grid, grid]`` cells whose centre lies on the image, not on the canvas padding."""
        centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * place.size / grid
        xs = (centres >= place.offset_x) & (centres < place.offset_x + place.content_width)
        ys = (centres >= place.offset_y) & (centres < place.offset_y + place.content_height)
        return ys[:, None] & xs[None, :]

    def content_cells(self, place: Placement, grid: int) -> torch.Tensor:
        """``[K, 2]`` (x, y) of the :meth:`content_mask` cells, row by row."""
        yy, xx = torch.nonzero(self.content_mask(place, grid), as_tuple=True)
        return torch.stack([xx, yy], 1)

    def _foregrounds(self, maps, places) -> list[torch.Tensor]:
        """Feature foregrounds (one PCA over ``maps``) restricted to the image content; the whole content
        where the foreground would be empty."""
        out = []
        for fg, place in zip(feature_foregrounds(maps), places):
            content = self.content_mask(place, fg.shape[-1])
            out.append(fg & content if (fg & content).any() else content)
        return out

    def describe(self) -> dict:
        d = {"method": self.recipe.label(), **self.recipe.describe(), "sd": self.sd.describe()}
        if self.dino is not None:
            d["dino_weights"] = {"path": str(self.dino.path), "size": self.dino.size, "channels": self.dino.channels}
        return d


def prompt_embedder(template: str | None, text_model):
    """``category -> embeddings`` for the SD side (``Fusion(prompts=...)``): ``template`` filled in ("" when
    the category is unknown) through ``text_model``'s encoder; None keeps the engine's baked prompt."""
    if not template or text_model is None:
        return None

    def embed(category: str | None):
        return text_model.encode_prompt(template.format(category=category) if category else "")

    return embed
