"""cleandift-rt: noise-free, timestep-free dense features from Stable Diffusion U-Nets (CleanDIFT)."""

from .build_info import _package_version, build_info, format_build_info
from .features.capture import unet_taps
from .runtime.engine import Engine
from .kernels.fused_heads import project
from .models.heads import ProjectionHeads
from .kernels.matching import match
from .taps import DEFAULT_TAP, TAP_TABLE, TAPS

__version__ = _package_version()

__all__ = ["Engine", "TAPS", "TAP_TABLE", "DEFAULT_TAP", "unet_taps", "ProjectionHeads", "build_info", "format_build_info", "match", "project"]
