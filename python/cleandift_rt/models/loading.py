"""Loading a base model from the user's disk: a diffusers folder or one original-format ``.safetensors`` file.

Never from a hub and never from a pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import check_finite_weights
from ..checks import read_json_file
from . import configs
from .base import BaseModel, schedule_alphas_cumprod, detect_variant
from .offline import diffusers, transformers
from .single_file import load_single_file


def load_base(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              text_encoder: bool = True, tokenizer: str | Path | None = None) -> BaseModel:
    """Load a base SD model from a local diffusers folder or a single ``.safetensors`` checkpoint.

    ``tokenizer`` (a CLIP tokenizer folder) matters only for single files, which carry none.
    """
    path = Path(path)
    if path.is_dir():
        base = _load_diffusers_folder(path, text_encoder)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: a single-file base model must be a .safetensors checkpoint "
                             "(pickled .ckpt/.bin files are never loaded: convert them to safetensors first)")
        base = load_single_file(path, text_encoder=text_encoder, tokenizer=tokenizer)
    else:
        raise FileNotFoundError(f"base model {path} does not exist (expected a diffusers folder or a .safetensors file)")
    base.to(device=device, dtype=dtype)
    for m in (base.unet, base.vae, base.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    return base


def _load_diffusers_folder(path: Path, text_encoder: bool) -> BaseModel:
    for part in ("unet", "vae"):
        if not (path / part / "config.json").is_file():
            raise ValueError(f"{path} is not a diffusers model folder: {part}/config.json is missing "
                             "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        read_json_file(path / part / "config.json")  # bounded before diffusers parses it (nesting, size)
    kwargs = dict(local_files_only=True, use_safetensors=True)
    try:
        unet = diffusers().UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = diffusers().AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise ValueError(f"cannot load {path}: {exc}. Weights must be .safetensors (pickled .bin files are "
                         "not loaded); convert them with diffusers' save_pretrained(safe_serialization=True)") from None
    te = tok = None
    if text_encoder and (path / "text_encoder").is_dir():
        if not (path / "tokenizer").is_dir():
            raise ValueError(f"{path} has text_encoder/ but no tokenizer/ folder: copy the base model's tokenizer/ "
                             "beside it (the text encoder cannot read prompts without it)")
        te = transformers().CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        tok = transformers().AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        if module is not None:  # a NaN in the weights is named here, not found as NaN features later
            check_finite_weights(module.state_dict(), f"{path / part}")
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched_config = read_json_file(sched_file) if sched_file.is_file() else dict(configs.SCHEDULER)
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, alphas_cumprod=schedule_alphas_cumprod(sched_config),
                     source=str(path), variant=detect_variant(unet.config))
