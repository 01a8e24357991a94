"""Fusion: the zero-shot state of the art of docs/method.md, zero-shot fusion, CleanDIFT's SD taps fused with DINOv2.

Owns DINOv2 patch features from the user's disk (``dinov2``: transformers folders, torch-hub
checkpoints converted on load by ``hub_checkpoint``, hub-style position-embedding interpolation),
the square canvas both models see (``canvas``), the SD taps us2 / us5 / us8 through an Engine with
the 2 x 2 crop scheme (``sd``), the ``tale`` and ``tlfr`` recipes as plain data and their fusion
arithmetic (``recipes``), SPair-71k's left/right keypoint table and the adaptive flip (``flip``),
the object that extracts, fuses and matches (``pipeline.Fusion``), and the fused SPair-71k
evaluation with its cache, journal and side-by-side report (``evaluate``, ``report``). It may
import ``evaluation``, ``kernels``, ``features``, ``viz`` and the top-level shared modules; an
Engine is passed in, never imported. Its commands are options of ``eval-spair`` and ``match``.
"""

from .dinov2 import Dinov2Features, hub_position_embeddings
from .flip import LEFT_RIGHT_PAIRS, SIDES, flipped_source_points, mirror_partner
from .pipeline import Fusion, Transfer
from .recipes import RECIPES, TALE, TLFR, Recipe, fuse, joint_pca

__all__ = ["Dinov2Features", "hub_position_embeddings", "LEFT_RIGHT_PAIRS", "SIDES", "flipped_source_points",
           "mirror_partner", "Fusion", "Transfer", "RECIPES", "TALE", "TLFR", "Recipe", "fuse", "joint_pca"]
