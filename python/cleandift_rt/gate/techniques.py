"""The off-the-shelf generation techniques GATE steers the U-Net with, each from the user's disk only.

- Canny edges of the input itself (OpenCV, thresholds 100 / 200) as ControlNet's control image:
  3 channels in [0, 1], as diffusers' ControlNet pipelines feed it.
- ControlNet: a diffusers ``ControlNetModel`` folder (safetensors weights).
- LoRA: a diffusers or kohya LoRA ``.safetensors`` file, converted by diffusers and injected through
  peft as a named adapter (several per U-Net, one active per recipe), or a folder holding a U-Net
  with a LoRA already merged (a diffusers ``UNet2DConditionModel`` folder, or a model folder with
  ``unet/``).
Pickled weights are refused everywhere (``checkpoint.read_safetensors``; diffusers with
``use_safetensors=True`` and ``local_files_only=True``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import read_safetensors
from ..models.offline import diffusers

CANNY_LOW, CANNY_HIGH = 100, 200
# Config entries that must agree for a ControlNet or a merged U-Net to fit the base U-Net.
_ARCHITECTURE_KEYS = ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels")


def canny_control(pixels: torch.Tensor) -> torch.Tensor:
    """Canny edges of ``B x 3 x H x W`` images in [-1, 1]: ``B x 3 x H x W`` float in {0, 1}."""
    try:
        import cv2
    except ImportError:
        raise ImportError("ControlNet's Canny control image needs OpenCV: pip install opencv-python-headless "
                          "(or the [gate] extra)") from None
    images = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    edges = []
    for img in images.permute(0, 2, 3, 1).numpy():
        e = cv2.Canny(np.ascontiguousarray(img), CANNY_LOW, CANNY_HIGH)  # 0 / 255, one channel
        edges.append(torch.from_numpy(np.repeat(e[None], 3, axis=0)))
    return torch.stack(edges).to(torch.float32) / 255.0


def _check_fits(config, unet: nn.Module, what: str, path: Path) -> None:
    wrong = [f"{k}: {config.get(k)!r} vs {unet.config.get(k)!r}" for k in _ARCHITECTURE_KEYS
             if k in config and _plain(config.get(k)) != _plain(unet.config.get(k))]
    if wrong:
        raise ValueError(f"{what} {path} does not fit this U-Net ({'; '.join(wrong)}): use one made for the same "
                         "Stable Diffusion version as the base model")


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _from_folder(cls, path: Path, what: str, subfolder: str | None = None):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True, use_safetensors=True)
    except (OSError, EnvironmentError) as exc:
        raise ValueError(f"cannot load {what} {path}: {exc}. Weights must be .safetensors (pickled .bin files are "
                         "never loaded); convert them with save_pretrained(safe_serialization=True)") from None


def load_controlnet(path: str | Path, unet: nn.Module) -> nn.Module:
    """A diffusers ``ControlNetModel`` folder, checked against the U-Net it will steer."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"ControlNet {path} must be a diffusers ControlNetModel folder (config.json and "
                         "diffusion_pytorch_model.safetensors)")
    model = _from_folder(diffusers().ControlNetModel, path, "ControlNet")
    _check_fits(model.config, unet, "ControlNet", path)
    return model.eval().requires_grad_(False)


def load_merged_unet(path: str | Path, unet: nn.Module) -> nn.Module:
    """A U-Net with a LoRA merged into it: a ``UNet2DConditionModel`` folder (or a model folder with ``unet/``)."""
    path = Path(path)
    sub = "unet" if (path / "unet" / "config.json").is_file() else None
    if sub is None and not (path / "config.json").is_file():
        raise ValueError(f"{path} is neither a LoRA .safetensors file nor a merged U-Net folder (config.json or "
                         "unet/config.json missing)")
    model = _from_folder(diffusers().UNet2DConditionModel, path, "merged U-Net", sub)
    _check_fits(model.config, unet, "merged U-Net", path)
    return model.eval().requires_grad_(False)


def add_lora_adapter(unet: nn.Module, path: str | Path, name: str) -> None:
    """Inject a diffusers- or kohya-format LoRA file into ``unet`` as the peft adapter ``name``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA {path} must be a .safetensors file (pickled .bin/.pt/.ckpt files are never loaded: "
                         "convert with safetensors.torch.save_file), or a merged U-Net folder")
    tensors = read_safetensors(path)
    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(tensors)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"LoRA {path} is not in a LoRA format diffusers reads (diffusers, kohya, peft): {exc}") from None
    if not any(k.startswith("unet.") for k in state):
        raise ValueError(f"LoRA {path} holds no U-Net weights (only text-encoder LoRAs?): GATE steers the U-Net")
    with warnings.catch_warnings():  # peft warns on every adapter after the first: several by name is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name=name)
    if name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"LoRA {path}: none of its keys matched this U-Net's layers (another SD version?)")


def select_lora(unet: nn.Module, name: str | None, scale: float) -> None:
    """Make adapter ``name`` the only active one at ``scale``, or turn every adapter off (``None``)."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return
    if name is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapters([name], weights=[float(scale)])
