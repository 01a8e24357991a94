"""Features: from images to the 11 tap maps in PyTorch, the reference every other path is checked against.

Owns the image input contract (decoding, size policies, pixels in [-1, 1]: ``preprocess``), tap
capture on any diffusers U-Net (``capture.unet_taps``, forward stopped after the last tap) and the
PyTorch extractors: the CleanDIFT student (``ReferenceExtractor``) and the noisy DIFT baseline
(``DiftExtractor``), the one feature-source protocol (``source.FeatureSource``) and the per-image
feature store every system above shares (``store.FeatureStore``: atomic writes, memory-mapped
reads, one fp16 policy). It may import ``models`` and the top-level shared modules.
"""

from .capture import unet_taps
from .extractor import DiftExtractor, ReferenceExtractor, check_prompt_embeds
from .preprocess import Geometry, Prepared, load_image, prepare_images, rgb8
from .source import DescriptorSource, FeatureSource
from .store import FP16_MAX, FeatureStore, image_key, round_trip

__all__ = ["unet_taps", "DiftExtractor", "ReferenceExtractor", "check_prompt_embeds", "Geometry", "Prepared",
           "load_image", "prepare_images", "rgb8", "DescriptorSource", "FeatureSource", "FP16_MAX", "FeatureStore",
           "image_key", "round_trip"]
