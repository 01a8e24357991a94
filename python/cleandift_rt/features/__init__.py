"""Features: from images to the 11 tap maps in PyTorch, the reference every other path is checked against.

Owns the image input contract (decoding, size policies, pixels in [-1, 1]: ``preprocess``), tap
capture on any diffusers U-Net (``capture.unet_taps``, forward stopped after the last tap) and the
PyTorch extractors: the CleanDIFT student (``ReferenceExtractor``) and the noisy DIFT baseline
(``DiftExtractor``). It may import ``models`` and the top-level shared modules.
"""

from .capture import unet_taps
from .extractor import DiftExtractor, ReferenceExtractor, check_prompt_embeds
from .preprocess import Geometry, Prepared, load_image, prepare_images, rgb8

__all__ = ["unet_taps", "DiftExtractor", "ReferenceExtractor", "check_prompt_embeds", "Geometry", "Prepared",
           "load_image", "prepare_images", "rgb8"]
