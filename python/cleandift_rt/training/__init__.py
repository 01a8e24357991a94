"""Training (docs/method.md, training): distil a frozen SD U-Net's noisy, timestep-dependent features into a student.

Owns the training configuration and presets, the captioned-image data, the distillation objective
(student taps once per image, heads at three stratified timesteps, teacher stopped after the last
tap), validation, atomic checkpoints and exact resume. Entry points: ``cleandift-rt train`` and
``python train/train.py`` (``cli/train.py``; docs/training.md). Also the distillation of the VAE
encoder into a fast encoder (``encoder``: ``cleandift-rt distill-encoder``; docs/fast_encoder.md). It may import ``features``, ``models`` and the top-level
shared modules.
"""

from .config import PRESETS, TrainConfig, build_config
from .objective import distillation_step, stratified_timesteps
from .trainer import Trainer

__all__ = ["TrainConfig", "PRESETS", "build_config", "Trainer", "distillation_step", "stratified_timesteps"]
