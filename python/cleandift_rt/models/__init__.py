"""Model files: Stable Diffusion base models and CleanDIFT students from the user's disk.

Owns the model configurations (plain data), loading a base model from a diffusers folder or a
single original-format ``.safetensors`` file, the tiny test model with SD's exact topology, the
student checkpoint formats of the public release (``_unet``, ``_full``) and the projection-head
architecture those files carry. It may import only the top-level shared modules (``taps``,
``checkpoint``, ``build_info``); every other stage builds on it.
"""

from .base import (DEFAULT_STUDENT_TIMESTEP, STUDENT_PREFIX, TEACHER_PREFIX, VAE_PREFIX, BaseModel, Student,
                   build_models, build_tiny_tokenizer, detect_variant, load_base, load_student, move_module,
                   save_student_full, save_student_unet, unet_config_json, write_tiny_base)

__all__ = ["BaseModel", "DEFAULT_STUDENT_TIMESTEP", "STUDENT_PREFIX", "TEACHER_PREFIX", "VAE_PREFIX", "Student", "build_models", "build_tiny_tokenizer",
           "detect_variant", "load_base", "load_student", "move_module", "save_student_full", "save_student_unet",
           "unet_config_json", "write_tiny_base"]
