"""Model files: Stable Diffusion base models and CleanDIFT students from the user's disk.

Owns the model configurations (plain data), loading a base model from a diffusers folder or a
single original-format ``.safetensors`` file, the tiny test model with SD's exact topology, the
student checkpoint formats of the public release (``_unet``, ``_full``), the projection-head
architecture those files carry, and fast encoders (``fast_encoder``: an ``AutoencoderTiny`` in place
of the VAE encoder, its folder and record). It may import only the top-level shared modules (``taps``,
``checkpoint``, ``build_info``); every other stage builds on it.
"""

from .base import BaseModel, detect_variant, move_module, schedule_alphas_cumprod
from .build import build_models, build_tiny_tokenizer, write_random_base, write_tiny_base
from .loading import load_base
from .student import (DEFAULT_STUDENT_TIMESTEP, STUDENT_PREFIX, TEACHER_PREFIX, VAE_PREFIX, Student, load_student,
                      load_student_and_base, save_student_full, save_student_unet, unet_config_json)

__all__ = ["BaseModel", "detect_variant", "move_module", "schedule_alphas_cumprod", "build_models",
           "build_tiny_tokenizer", "write_tiny_base", "write_random_base", "load_base", "DEFAULT_STUDENT_TIMESTEP",
           "STUDENT_PREFIX", "TEACHER_PREFIX", "VAE_PREFIX", "Student", "load_student", "load_student_and_base",
           "save_student_full", "save_student_unet", "unet_config_json"]
