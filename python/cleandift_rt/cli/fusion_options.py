"""The fusion options ``eval-spair``, ``eval-pairs`` and ``match`` share: which recipe, the DINOv2
weights, the canvases, the ablation switches; and what turns them into a recipe, DINOv2 features and
a prompt (``fusion.pipeline.Fusion`` and ``prompt_embedder`` do the rest)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..fusion.recipes import FUSION_PROMPT, RECIPES, Recipe

NEAREST_NEIGHBOUR = "nn"  # today's protocol: one tap, cosine argmax over the upsampled target
RECIPE_CHOICES = (NEAREST_NEIGHBOUR, *RECIPES)
NEED_DINO = ("the tale and tlfr recipes fuse DINOv2 features: pass --dino PATH (a transformers Dinov2Model folder or "
             "a torch-hub checkpoint as .safetensors), or --no-dino")


def add_recipe_args(p: argparse.ArgumentParser, several: bool) -> None:
    g = p.add_argument_group("fusion recipes (docs/fusion.md)")
    g.add_argument("--recipe", nargs="+" if several else None, choices=RECIPE_CHOICES,
                   default=[NEAREST_NEIGHBOUR] if several else NEAREST_NEIGHBOUR,
                   help="nn: nearest neighbour on the engine's --tap (default); tale: 'A Tale of Two Features' "
                   "(joint PCA of us8/us5/us2 + DINOv2); tlfr: 'Telling Left from Right' (us8/us5/us2 + DINOv2, "
                   "window soft-argmax, adaptive flip)" + ("; several run side by side" if several else ""))
    g.add_argument("--dino", metavar="PATH", help="DINOv2 weights: a transformers Dinov2Model folder or a torch-hub "
                   "ViT-S/B/L/g-14 checkpoint as .safetensors (needed by tale and tlfr unless --no-dino)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="let --dino load the hub's pickled .pth (through torch.load(weights_only=True))")
    g.add_argument("--dino-size", type=int, default=RECIPES["tlfr"].dino_size, metavar="PX",
                   help="DINOv2 canvas side, a multiple of 14 (default 840: 60 x 60 patches)")
    g.add_argument("--sd-size", type=int, default=RECIPES["tlfr"].sd_size, metavar="PX",
                   help="SD canvas side, a multiple of 64 (default 960)")
    g.add_argument("--sd-crop", type=int, default=RECIPES["tlfr"].sd_crop, metavar="PX",
                   help="side of the 2 x 2 overlapping SD crops (default 512, as the original); 0 = one pass over "
                   "the whole canvas. Run the engine at this size (--size 512 512) or its maps are resized")
    g.add_argument("--no-flip", action="store_true", help="ablation: no adaptive flip (tlfr)")
    g.add_argument("--no-refine", action="store_true", help="ablation: hard argmax instead of the window soft-argmax (tlfr)")
    g.add_argument("--no-dino", action="store_true", help="ablation: SD taps only, no DINOv2")


def recipe_from_args(name: str, args) -> Recipe:
    """The named recipe with the canvases and ablation switches of ``args``."""
    recipe = replace(RECIPES[name], sd_size=args.sd_size, sd_crop=args.sd_crop or None, dino_size=args.dino_size)
    return recipe.with_parts(flip=not args.no_flip, refine=not args.no_refine, dino=not args.no_dino)


def wants_fusion(names) -> bool:
    return any(n != NEAREST_NEIGHBOUR for n in names)


def check_recipe_args(args, names) -> None:
    """The fusion options checked before any model loads (one-line errors, nothing wasted)."""
    if not wants_fusion(names):
        return
    from pathlib import Path

    from ..fusion.sd import GRID_MULTIPLE

    if args.sd_size <= 0 or args.sd_size % GRID_MULTIPLE or args.sd_crop < 0 or args.sd_crop % GRID_MULTIPLE:
        raise ValueError(f"--sd-size {args.sd_size} and --sd-crop {args.sd_crop} must be multiples of {GRID_MULTIPLE} "
                         "(--sd-crop 0: one pass)")
    if args.sd_crop > args.sd_size:
        raise ValueError(f"--sd-crop {args.sd_crop} is larger than --sd-size {args.sd_size}")
    if args.no_dino:
        return
    if not args.dino:
        raise ValueError(NEED_DINO)
    if not Path(args.dino).exists():
        raise FileNotFoundError(f"--dino {args.dino} does not exist")
    if args.dino_size <= 0 or args.dino_size % 14:
        raise ValueError(f"--dino-size {args.dino_size} must be a positive multiple of DINOv2's 14 px patches (840: 60 x 60)")


def open_dino(args):
    """``Dinov2Features`` from ``--dino`` (None under --no-dino); a clear error when it is missing."""
    if args.no_dino:
        return None
    if not args.dino:
        raise ValueError(NEED_DINO)
    from ..fusion.dinov2 import Dinov2Features

    return Dinov2Features(args.dino, size=args.dino_size, device=args.device, allow_pickle=args.allow_pickle)


def resolve_prompt(args, fused: bool) -> str:
    """``--prompt`` as given, else the protocol's: DIFT's for nn, the recipes' own for tale / tlfr."""
    if getattr(args, "prompt", None) is not None:
        return args.prompt
    from ..evaluation.runner import DEFAULT_PROMPT as NN_PROMPT

    return FUSION_PROMPT if fused else NN_PROMPT
