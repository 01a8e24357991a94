"""GATE (Meng et al. 2024; docs/method.md, GATE): suppressing content shift in diffusion features.

Owns the extraction recipes (fine-grained prompts, ControlNet on the image's own Canny edges,
LoRA adapters or merged U-Nets, multi-step denoising) for the noisy baseline and for a CleanDIFT
student on the PyTorch backend, the conv and cross-attention feature kinds, buckets of technique
combinations and their learned amalgamation (weight assigner, CLIP loss plus sparsity, cached
fp16 features, resumable training), the content-shift score and the img2img comparison picture,
and a feature source for ``evaluation.runner.evaluate``. It may import ``features``, ``models``
and the top-level shared modules (``taps``, ``checkpoint``); its commands are in ``cli/gate.py``.
"""

from .extract import GateExtractor
from .recipe import Bucket, GateRecipe
from .score import content_shift_score

__all__ = ["GateRecipe", "Bucket", "GateExtractor", "content_shift_score"]
