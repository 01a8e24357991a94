"""cleandift-rt: noise-free, timestep-free dense features from Stable Diffusion U-Nets (CleanDIFT).

The package is one subpackage per stage of the data's way (docs/architecture.md):
``models`` -> ``features`` -> ``kernels`` / ``formats`` -> ``runtime`` -> ``export`` ->
``evaluation`` / ``training`` -> ``cli``, over the shared ``taps``, ``checkpoint`` and
``build_info`` modules. What users call is re-exported here.
"""

from .build_info import _package_version, build_info, format_build_info
from .extraction.shards import read_shards
from .features.capture import unet_taps
from .fusion.dinov2 import Dinov2Features
from .hyper.aggregator import Aggregator
from .hyper.network import AggregationNetwork
from .kernels.fused_heads import project
from .kernels.matching import match
from .kernels.points import match_points
from .models.heads import ProjectionHeads
from .runtime.engine import Engine
from .taps import DEFAULT_TAP, TAP_TABLE, TAPS
from .tracking.tracker import Tracker, TrackResult

__version__ = _package_version()

__all__ = ["Engine", "TAPS", "TAP_TABLE", "DEFAULT_TAP", "unet_taps", "ProjectionHeads", "build_info", "format_build_info", "match", "project",
           "Dinov2Features", "AggregationNetwork", "Aggregator", "read_shards", "match_points", "Tracker", "TrackResult"]
