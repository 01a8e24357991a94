"""The recipes the explorer offers, each as one object that owns its descriptor maps of the loaded
images and answers a click on one image with the best match on another.

- :class:`TapRecipe`: one of the engine's outputs as it is (a raw tap, or ``"hyper"``, the
  Diffusion Hyperfeatures descriptor an engine with an aggregator returns beside its taps).
- :class:`ProjectedRecipe`: a tap through the projection heads at a timestep (the fused ``project``
  kernel): the features as the teacher sees them at ``t``.
- :class:`FusionRecipe`: a ``fusion.Fusion`` (``tale``, ``tlfr``: SD taps + DINOv2), its descriptors
  and its own cell and soft-argmax conventions (``Fusion.cells_of`` / ``match_cells`` / ``to_image``).

Maps are computed once per image (per pair for ``tale``, whose PCA is the pair's) and kept until
the image is removed; a click then runs only the matching. Every map comes with a :class:`GridMap`
from image pixels to grid cells (centres at integers), which the heat map and the PCA picture use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels.fused_heads import project
from ..kernels.matching import sample_points
from ..kernels.points import match_points


@dataclass(frozen=True)
class GridMap:
    """Image pixel -> grid cell, per axis ``cell = pixel * scale + offset`` (pixel and cell centres at
    integers)."""

    scale_x: float
    offset_x: float
    scale_y: float
    offset_y: float

    def to_grid(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return p * [self.scale_x, self.scale_y] + [self.offset_x, self.offset_y]

    def to_image(self, cells) -> np.ndarray:
        c = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
        return (c - [self.offset_x, self.offset_y]) / [self.scale_x, self.scale_y]

    def shifted(self, dx: int, dy: int) -> GridMap:
        """The same map on a grid cropped to start at cell ``(dx, dy)``."""
        return GridMap(self.scale_x, self.offset_x - dx, self.scale_y, self.offset_y - dy)


@dataclass
class Match:
    """The answer of one target image to a click."""

    xy: tuple[float, float]  # best match, target image pixels (soft-argmax refined where the recipe refines)
    similarity: float  # cosine similarity of the best cell
    heat: torch.Tensor  # [h, w] cosine similarity of every target cell to the clicked point
    grid: GridMap  # target image pixel -> heat cell


def model_gridmap(geometry, model_size, grid_hw) -> GridMap:
    """The GridMap of an image on an engine's feature grid: image -> model input (the size policy's
    ``preprocess.Geometry``, stretch or pad) -> a ``grid_hw`` grid covering the whole model input."""
    (model_h, model_w), (h, w) = model_size, grid_hw
    sx, sy = geometry.scale_x * w / model_w, geometry.scale_y * h / model_h
    return GridMap(sx, 0.5 * sx - 0.5, sy, 0.5 * sy - 0.5)


def cosine_map(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[h, w]`` cosine similarity of a ``[C]`` vector to every cell of a ``[C, h, w]`` map."""
    return torch.einsum("chw,c->hw", F.normalize(target.float(), dim=0), F.normalize(query.float(), dim=0))


class TapRecipe:
    """One engine output as it is: a tap, or ``"hyper"``. ``image.taps`` holds it from loading."""

    kind = "tap"

    def __init__(self, tap: str, model_size):
        self.tap, self.model_size = tap, tuple(model_size)
        self.key = f"{self.kind}:{tap}"

    def label(self) -> str:
        return "hyper (Diffusion Hyperfeatures)" if self.tap == "hyper" else f"tap {self.tap}"

    def feature_map(self, image) -> torch.Tensor:
        return image.taps[self.tap]

    def gridmap(self, image) -> GridMap:
        return model_gridmap(image.geometry, self.model_size, self.feature_map(image).shape[-2:])

    def prepare(self, images) -> None:
        for image in images:
            self.feature_map(image)

    def forget(self, image_id: int) -> None:
        """Nothing of its own to drop: the taps live on the image."""

    def maps(self, images) -> list[tuple[torch.Tensor, GridMap]]:
        """Each image's map and its GridMap (for the PCA picture)."""
        return [(self.feature_map(im), self.gridmap(im)) for im in images]

    def click(self, source, point, targets) -> list[Match]:
        src = self.feature_map(source)
        cell = torch.as_tensor(self.gridmap(source).to_grid(point), dtype=torch.float32)  # [1, 2] feature pixels
        query = sample_points(src[None], cell[None])[0, 0]
        out = []
        for target in targets:
            dst, grid = self.feature_map(target), self.gridmap(target)
            # the native kernel: bilinear source vector, cosine argmax, window soft-argmax (feature pixels)
            found, sim = match_points(src, cell, dst)
            x, y = grid.to_image(found.numpy())[0]
            out.append(Match((float(x), float(y)), float(sim[0]), cosine_map(query, dst), grid))
        return out


class ProjectedRecipe(TapRecipe):
    """A tap through the projection heads at timestep ``t`` (computed once per image and t)."""

    kind = "projected"

    def __init__(self, tap: str, t: float, heads, model_size):
        super().__init__(tap, model_size)
        self.t, self.heads = float(t), heads
        self.key = f"{self.kind}:{tap}@{self.t:g}"
        self._maps: dict[int, torch.Tensor] = {}

    def label(self) -> str:
        return f"tap {self.tap} projected by the heads at t = {self.t:g}"

    def feature_map(self, image) -> torch.Tensor:
        if image.id not in self._maps:
            self._maps[image.id] = project(image.taps[self.tap][None].contiguous(), self.t, self.heads, self.tap)[0]
        return self._maps[image.id]

    def forget(self, image_id: int) -> None:
        self._maps.pop(image_id, None)


class FusionRecipe:
    """A fusion recipe (``fusion.Fusion``: tale / tlfr). Raw maps once per image; descriptors once per
    ordered pair (tale's PCA is the pair's); a click takes the cell under the point and the recipe's own
    matching (hard argmax, or tlfr's 11 x 11 soft-argmax). No adaptive flip: it needs keypoint ids."""

    kind = "fusion"

    def __init__(self, fusion):
        self.fusion = fusion
        self.key = f"{self.kind}:{fusion.recipe.label()}"
        self._raw: dict[int, dict] = {}
        self._pairs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def label(self) -> str:
        return f"{self.fusion.recipe.label()} (SD taps + DINOv2 fusion)" if self.fusion.recipe.dino \
            else f"{self.fusion.recipe.label()} (SD taps fused, no DINOv2)"

    def raw(self, image) -> dict:
        if image.id not in self._raw:
            self._raw[image.id] = self.fusion.raw([image.image])[0]
        return self._raw[image.id]

    def pair(self, source, target) -> tuple[torch.Tensor, torch.Tensor]:
        key = (source.id, target.id)
        if key not in self._pairs:
            self._pairs[key] = tuple(self.fusion.descriptors([self.raw(source), self.raw(target)]))
        return self._pairs[key]

    def gridmap(self, image, grid: int) -> GridMap:
        place = self.fusion.placement(*image.image.size)
        s = place.scale * grid / place.size  # canvas pixel p * grid / size is cell p - 0.5 (cells_of's floor)
        return GridMap(s, place.offset_x * grid / place.size - 0.5, s, place.offset_y * grid / place.size - 0.5)

    def prepare(self, images) -> None:
        for source in images:
            for target in images:
                if target is not source:
                    self.pair(source, target)

    def forget(self, image_id: int) -> None:
        self._raw.pop(image_id, None)
        for key in [k for k in self._pairs if image_id in k]:
            del self._pairs[key]

    def maps(self, images) -> list[tuple[torch.Tensor, GridMap]]:
        """Descriptors fused over all images at once (tale: one PCA over all), for one shared PCA picture."""
        descs = self.fusion.descriptors([self.raw(im) for im in images])
        return [(d, self.gridmap(im, d.shape[-1])) for d, im in zip(descs, images)]

    def click(self, source, point, targets) -> list[Match]:
        fusion, out = self.fusion, []
        place = fusion.placement(*source.image.size)
        for target in targets:
            src, dst = self.pair(source, target)
            grid = dst.shape[-1]
            cells = fusion.cells_of(place, np.asarray(point, dtype=np.float64).reshape(1, 2), grid)
            found, sim = fusion.match_cells(src, dst, cells)
            x, y = fusion.to_image(fusion.placement(*target.image.size), found, grid)[0]
            query = src[:, int(cells[0, 1]), int(cells[0, 0])]
            out.append(Match((float(x), float(y)), float(sim[0]), cosine_map(query, dst), self.gridmap(target, grid)))
        return out
