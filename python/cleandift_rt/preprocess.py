"""Kept for ``cleandift_rt.preprocess`` users: image input handling now lives in ``cleandift_rt.features``."""

from .features.preprocess import (MIN_SIDE, RESIZE_POLICIES, SIZE_MULTIPLE, Geometry, Prepared, batch_size_of,
                                  check_model_size, check_policy, load_image, prepare_images)

__all__ = ["MIN_SIDE", "RESIZE_POLICIES", "SIZE_MULTIPLE", "Geometry", "Prepared", "batch_size_of",
           "check_model_size", "check_policy", "load_image", "prepare_images"]
