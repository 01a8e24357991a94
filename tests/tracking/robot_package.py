"""Robot-DIFT encoder packages in the published layout, written from a tiny U-Net, and an independent
transcription of their extraction (diffusers and transformers called directly, taps by forward hooks
on the whole U-Net forward) to check the engine against."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TAPS = ("us3", "us6", "us8")
MODULES = {"us3": "up_blocks.0.upsamplers.0", "us6": "up_blocks.1.upsamplers.0", "us8": "up_blocks.2.attentions.1"}


def student_unet(base_unet, seed: int = 5):
    """A copy of the base U-Net with every parameter moved (as after distillation)."""
    unet = copy.deepcopy(base_unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * (p.abs().mean() + 1e-3))
    return unet.eval()


def write_package(folder: Path, unet, timestep=217.5, *, feature_dims=None, weights="diffusion_pytorch_model.safetensors",
                  metadata=None, drop=()) -> Path:
    """The package folder: metadata.json, timestep.bin, unet/<weights>; ``metadata`` overrides fields
    (None values delete them), ``drop`` names metadata keys to leave out."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    channels = list(unet.config.block_out_channels)
    dims = feature_dims or {"us3": channels[3], "us6": channels[2], "us8": channels[1]}
    meta = {"model_type": "cleandift", "sd_version": "sd21", "use_text_condition": True,
            "components": {"student_unet": "unet"}, "feature_dims": dims, "vae_latent_mode": "mode"}
    meta.update(metadata or {})
    meta = {k: v for k, v in meta.items() if v is not None and k not in drop}
    (folder / "metadata.json").write_text(json.dumps(meta))
    torch.save({"timestep": torch.tensor(timestep)}, folder / "timestep.bin")
    (folder / "unet").mkdir(exist_ok=True)
    state = {k: v.contiguous().clone() for k, v in unet.state_dict().items()}
    if weights.endswith(".bin"):
        torch.save(state, folder / "unet" / weights)
    else:
        save_file(state, str(folder / "unet" / weights))
    return folder


@torch.no_grad()
def transcribed_features(base_dir: Path, package: Path, pixels: torch.Tensor, prompts: list[str], seed=None):
    """The package's extraction written out from its description, without cleandift_rt's code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPTextModel

    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "tokenizer")
    config = UNet2DConditionModel.load_config(base_dir, subfolder="unet")
    unet = UNet2DConditionModel.from_config(config).eval()
    unet.load_state_dict(load_file(str(package / "unet" / "diffusion_pytorch_model.safetensors")), strict=True)
    timestep = torch.load(package / "timestep.bin", weights_only=True)["timestep"]

    posterior = vae.encode(pixels).latent_dist
    if seed is None:
        z = posterior.mode()
    else:
        eps = torch.randn((1, *posterior.mean.shape[1:]), generator=torch.Generator().manual_seed(seed))
        z = posterior.mean + posterior.std * eps
    latents = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    embeds = text_encoder(ids)[0]
    captured = {}
    for tap, path in MODULES.items():
        unet.get_submodule(path).register_forward_hook(lambda _m, _i, out, tap=tap: captured.__setitem__(
            tap, out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))
    unet(latents, timestep, encoder_hidden_states=embeds)
    return {t: captured[t] for t in TAPS}, embeds
