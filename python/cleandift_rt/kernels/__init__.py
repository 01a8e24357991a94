"""Kernels: the Python faces of the native ops in ``csrc/`` (CPU SIMD paths and CUDA).

Owns ``match`` (fused cosine-similarity nearest neighbours, top-k and mutual, without an N x M
matrix; window soft-argmax refinement), ``match_points`` (the match for given pixels) and
``project`` (the fused projection head). Input checks, dtype/device dispatch and caches live here;
the math lives in ``csrc/``. It may import ``models`` (the head definitions ``project`` runs) and the
top-level shared modules.
"""

from .fused_heads import project
from .matching import match, sample_points
from .points import match_points

__all__ = ["match", "match_points", "project", "sample_points"]
