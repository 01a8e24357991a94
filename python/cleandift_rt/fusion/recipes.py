"""The two fusion recipes as plain data, and the tensor arithmetic that turns raw maps into descriptors.

``tale`` ("A Tale of Two Features"): a joint PCA over the image pair reduces each SD map (us8, us5,
us2) to 256 channels; us2 is upsampled to the us5 grid and both to the us8 grid (the reference's
order of upsampling), the SD part and the DINO part are each L2-normalised and concatenated with
weight 1; matching by cosine, which ranks like the reference's negative L2 distance since every
descriptor has the same norm. Hard argmax, no flip.

``tlfr`` ("Telling Left from Right", zero-shot): no PCA; us8, us5 and us2 upsampled to the DINO
grid and concatenated with DINO (640 + 1280 + 1280 + 768 = 3968 channels at SD 2.1 / ViT-B); the
SD part and the DINO part normalised separately, then the whole vector; window soft-argmax
(11 x 11, temperature 0.02, outside similarities 0) and the adaptive flip.

Raw maps per image: ``{"us8": [C, h, w], "us5": ..., "us2": ..., "dino": [C', g, g]}``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .sd import SD_TAPS

# The fusion recipes' prompt, capitalised as in the CleanDIFT geoaware-sc-eval branch whose fused
# SPair-71k numbers the recipes reproduce. The package's default prompt (DIFT-style evaluation,
# evaluation.runner.DEFAULT_PROMPT) is "a photo of a {category}": each pipeline keeps the prompt
# its published numbers were measured with, so the two differ in case on purpose.
FUSION_PROMPT = "A photo of a {category}"


@dataclass(frozen=True)
class Recipe:
    """One fusion recipe and its switches (docs/method.md, zero-shot fusion values as defaults)."""

    name: str
    pca_dims: int | None = None  # joint PCA per SD map over the pair (tale: 256); None: raw maps
    dino: bool = True
    normalize_whole: bool = False  # after the per-part normalisation (tlfr)
    flip: bool = False  # adaptive pose alignment
    refine: bool = False  # window soft-argmax around the argmax
    window: int = 11
    temperature: float = 0.02
    sd_size: int = 960  # SD canvas, long side; zero-padded square
    sd_crop: int | None = 512  # 2 x 2 overlapping crops of this side; None: one pass
    dino_size: int = 840  # DINOv2 canvas (60 x 60 patches of 14 px)
    prompt: str = FUSION_PROMPT

    def label(self) -> str:
        """The recipe's name plus the parts switched off relative to its published form."""
        base = RECIPES[self.name]
        off = [part for part in ("flip", "refine", "dino") if getattr(base, part) and not getattr(self, part)]
        return "-".join([self.name] + [f"no{part}" for part in off])

    def with_parts(self, *, flip: bool = True, refine: bool = True, dino: bool = True) -> Recipe:
        """The recipe with parts switched off (``False``); a part the recipe never had stays off."""
        return replace(self, flip=self.flip and flip, refine=self.refine and refine, dino=self.dino and dino)

    def describe(self) -> dict:
        return {"recipe": self.name, "pca_dims": self.pca_dims, "dino": self.dino, "normalize_whole": self.normalize_whole,
                "flip": self.flip, "refine": self.refine,
                "window": self.window if self.refine else None, "temperature": self.temperature if self.refine else None,
                "sd_size": self.sd_size, "sd_crop": self.sd_crop, "dino_size": self.dino_size if self.dino else None}


TALE = Recipe("tale", pca_dims=256)
TLFR = Recipe("tlfr", normalize_whole=True, flip=True, refine=True)
RECIPES = {"tale": TALE, "tlfr": TLFR}


def _sign_fixed(vecs: torch.Tensor) -> torch.Tensor:
    """Eigenvectors have no sign: make each column's largest-magnitude entry positive (reproducible)."""
    signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(vecs.shape[1])])
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def joint_pca(maps: list[torch.Tensor], dims: int) -> list[torch.Tensor]:
    """One exact PCA over the cells of all ``[C, h, w]`` maps (centred on their joint mean), each map
    projected to ``min(dims, C)`` components: ``[dims, h, w]``.

    Sums over the maps are taken map by map and added, so the result does not depend on their order
    (a pair swapped gives bit-identical components). The eigendecomposition is exact, in float32 as
    the reference computes (0.6 s for 1280 channels on 2 cores, float64 3x that); the reference's
    randomised ``torch.pca_lowrank`` is not reproducible.
    """
    rows = [m.flatten(1).T.float() for m in maps]
    count = sum(r.shape[0] for r in rows)
    mean = (sum(r.double().sum(0) for r in rows) / count).float()
    centred = [r - mean for r in rows]
    cov = sum(c.T @ c for c in centred) / max(1, count - 1)
    vals, vecs = torch.linalg.eigh(cov)
    k = min(dims, vecs.shape[1])
    basis = _sign_fixed(vecs[:, torch.argsort(vals, descending=True)[:k]])
    return [(c @ basis).T.reshape(k, *m.shape[1:]).contiguous() for c, m in zip(centred, maps)]


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return F.interpolate(x[None], size=(side, side), mode="bilinear", align_corners=False)[0]


def descriptor_grid(recipe: Recipe, raw: dict) -> int:
    """Side of the descriptor grid: the DINO grid, or the us8 grid without DINO."""
    return int(raw["dino"].shape[-1]) if recipe.dino else int(raw["us8"].shape[-1])


def fuse(recipe: Recipe, raws: list[dict]) -> list[torch.Tensor]:
    """Descriptor maps ``[D, g, g]`` for a batch of raw maps (for ``tale`` the batch is the pair whose
    joint PCA it shares; ``tlfr`` treats each image alone)."""
    if not raws:
        raise ValueError("fuse needs at least one image's raw maps")
    grid = descriptor_grid(recipe, raws[0])
    sd = [[r[t].float() for t in SD_TAPS] for r in raws]
    if recipe.pca_dims:
        per_tap = [joint_pca([maps[j] for maps in sd], recipe.pca_dims) for j in range(len(SD_TAPS))]
        sd = [[per_tap[j][i] for j in range(len(SD_TAPS))] for i in range(len(raws))]
    out = []
    for maps, raw in zip(sd, raws):
        us8, us5, us2 = maps
        if recipe.pca_dims:  # the reference upsamples us2 to the us5 grid first, then both to the grid
            us2 = _resize(us2, us5.shape[-1])
        part_sd = F.normalize(torch.cat([_resize(us8, grid), _resize(us5, grid), _resize(us2, grid)]), dim=0)
        parts = [part_sd]
        if recipe.dino:
            dino = raw["dino"].float()
            if dino.shape[-1] != grid:
                raise ValueError(f"DINO map is {dino.shape[-1]}x{dino.shape[-1]}, the descriptor grid {grid}x{grid}")
            parts.append(F.normalize(dino, dim=0))
        desc = torch.cat(parts)
        out.append(F.normalize(desc, dim=0) if recipe.normalize_whole else desc)
    return out
