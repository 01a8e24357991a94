"""CleanDIFT training (SPEC section 5): distil a frozen SD U-Net's noisy, timestep-dependent features
into a student that sees clean images. Entry point: ``python train/train.py`` (see docs/training.md)."""

from .config import PRESETS, TrainConfig, build_config
from .objective import distillation_step, stratified_timesteps
from .trainer import Trainer

__all__ = ["TrainConfig", "PRESETS", "build_config", "Trainer", "distillation_step", "stratified_timesteps"]
