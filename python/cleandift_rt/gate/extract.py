"""GATE feature extraction on the PyTorch backend: a :class:`GateRecipe` applied to one image.

Noisy baseline (docs/method.md, GATE): image -> VAE posterior *sample* x scaling factor -> the scheduler's
``add_noise`` at ``t`` (or at ``t_start``, then deterministic DDIM steps of one training timestep
each down to ``t``) -> the base U-Net with the recipe's prompt, LoRA and ControlNet residuals at
every call, no classifier-free guidance -> features from the last call. A CleanDIFT student takes
the clean latent (posterior mean) at its own timestep in one call, with the same one-pass
techniques. The whole U-Net is needed (the block-3 output, ControlNet residuals), so this runs on
PyTorch, not on pruned exports.

Feature kinds, at the grid of tap us9 (image / 8: 64 x 64 at 512 px), nearest-resized:
- conv: us3, us6, us9 and the output of ``up_blocks.3``, concatenated (3520 channels for SD 1.5);
- attention: cross-attention probabilities of up blocks 1 and 2 (16 x 16 and 32 x 32 at 512 px),
  head-averaged, the layers of one block averaged, concatenated: 2 x 77 = 154 channels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ..features.capture import cross_attention_layers, unet_capture
from ..features.preprocess import check_model_size, prepare_images
from ..models import BaseModel, Student, move_module
from ..models.configs import SCHEDULER
from ..models.offline import diffusers
from ..taps import TAP_TABLE, tap_channels
from .recipe import NUM_TRAIN_TIMESTEPS, Bucket, GateRecipe
from .techniques import add_lora_adapter, canny_control, load_controlnet, load_merged_unet, select_lora

CONV_TAPS = ("us3", "us6", "us9")
BLOCK3 = "up_blocks.3"  # the last decoder block's output: not one of the 11 taps
CONV_PARTS = (*CONV_TAPS, BLOCK3)
ATTENTION_BLOCKS = (1, 2)
GRID_TAP = "us9"  # the common grid: image / 8


def attention_key(block: int) -> str:
    return f"attention.up_blocks.{block}"


ATTENTION_PARTS = tuple(attention_key(b) for b in ATTENTION_BLOCKS)


def attention_tap(block: int) -> str:
    """The tap at the resolution of a decoder block's attention layers (from the single tap table)."""
    return next(name for name, tap in TAP_TABLE.items() if tap.module.startswith(f"up_blocks.{block}.attentions."))


def grid_size(size: tuple[int, int]) -> tuple[int, int]:
    stride = TAP_TABLE[GRID_TAP].stride
    return size[0] // stride, size[1] // stride


def conv_channels(block_out_channels) -> int:
    per_tap = tap_channels(block_out_channels)
    return sum(per_tap[t] for t in CONV_TAPS) + int(block_out_channels[0])  # up_blocks.3 has the first block's width


def conv_feature(parts: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """``[C, gh, gw]`` from the native-resolution parts (``C x h x w`` each), nearest-resized and concatenated."""
    return torch.cat([F.interpolate(parts[k][None].float(), size=grid, mode="nearest")[0] for k in CONV_PARTS])


def attention_feature(parts: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """``[2 L, gh, gw]``: the per-block averaged probability maps, nearest-resized and concatenated."""
    return torch.cat([F.interpolate(parts[k][None].float(), size=grid, mode="nearest")[0] for k in ATTENTION_PARTS])


def scheduler_config(base: BaseModel) -> dict:
    """The base model's noise schedule: its ``scheduler/scheduler_config.json``, else SD's default."""
    path = Path(base.source) / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return dict(SCHEDULER)


def ddim_one_step_scheduler(base: BaseModel):
    """DDIM (eta 0) over the base's betas with one training timestep per step, so ``step`` from t
    lands on t - 1; its ``add_noise`` is SD img2img's noising."""
    sched = diffusers().DDIMScheduler.from_config(scheduler_config(base))
    if sched.config.num_train_timesteps != NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the base model's scheduler has {sched.config.num_train_timesteps} training timesteps; "
                         f"GATE recipes assume Stable Diffusion's {NUM_TRAIN_TIMESTEPS}")
    sched.set_timesteps(NUM_TRAIN_TIMESTEPS)
    return sched


class GateExtractor:
    """Runs recipes on images with one base model (and optionally a CleanDIFT student).

    ``controlnets``: name -> ControlNetModel folder; ``loras``: name -> LoRA ``.safetensors`` (a peft
    adapter on the U-Net: the extractor adds adapters to the U-Net it is given, all off unless a
    recipe asks) or a merged U-Net folder. ``size``: model input (default: the base's resolution).
    """

    def __init__(self, base: BaseModel, *, controlnets: Mapping[str, str | Path] | None = None,
                 loras: Mapping[str, str | Path] | None = None, student: Student | None = None, size=None,
                 device="cpu", dtype: torch.dtype = torch.float32):
        self.base, self.student = base, student
        self.device, self.dtype = torch.device(device), dtype
        self.size = check_model_size(size if size is not None else base.resolution)
        self.grid = grid_size(self.size)
        base.to(device=self.device, dtype=dtype)
        self.unet = student.unet if student is not None else base.unet
        move_module(self.unet, self.device, dtype)
        self.scheduler = ddim_one_step_scheduler(base)
        self.controlnets = {name: move_module(load_controlnet(path, self.unet), self.device, dtype)
                            for name, path in (controlnets or {}).items()}
        self.merged: dict[str, torch.nn.Module] = {}
        self.files = {**{("controlnet", n): str(p) for n, p in (controlnets or {}).items()},
                      **{("lora", n): str(p) for n, p in (loras or {}).items()}}  # what the names stand for
        for name, path in (loras or {}).items():
            if Path(path).is_dir():
                self.merged[name] = move_module(load_merged_unet(path, self.unet), self.device, dtype)
            else:
                add_lora_adapter(self.unet, path, name)
        self.loras = sorted({*self.merged, *getattr(self.unet, "peft_config", {})})
        select_lora(self.unet, None, 1.0)
        self.attention_layers = cross_attention_layers(self.unet, ATTENTION_BLOCKS)

    @classmethod
    def for_bucket(cls, bucket: Bucket, base: BaseModel, **kwargs) -> "GateExtractor":
        """Load only the ControlNets and LoRAs the bucket's recipes use; the bucket's size unless given."""
        if kwargs.get("size") is None:
            kwargs["size"] = bucket.size
        extractor = cls(base, controlnets={n: bucket.controlnets[n] for n in bucket.used_controlnets},
                        loras={n: bucket.loras[n] for n in bucket.used_loras}, **kwargs)
        for recipe in bucket.recipes():  # e.g. multi-step with a student: refused now, not at the first image
            extractor.check(recipe)
        return extractor

    @property
    def conv_channels(self) -> int:
        return conv_channels(self.unet.config.block_out_channels)

    @property
    def attention_channels(self) -> int:
        tokens = getattr(self.base.tokenizer, "model_max_length", 77)  # the prompt is padded to it
        return len(ATTENTION_BLOCKS) * int(tokens)

    def check(self, recipe: GateRecipe) -> None:
        if recipe.controlnet is not None and recipe.controlnet not in self.controlnets:
            raise ValueError(f"recipe uses ControlNet {recipe.controlnet!r}; this extractor has "
                             f"{sorted(self.controlnets) or 'none'} (pass controlnets={{name: folder}})")
        if recipe.lora is not None and recipe.lora not in self.loras:
            raise ValueError(f"recipe uses LoRA {recipe.lora!r}; this extractor has {self.loras or 'none'} "
                             "(pass loras={name: file})")
        if recipe.lora in self.merged and recipe.lora_scale != 1.0:
            raise ValueError(f"LoRA {recipe.lora!r} is a merged U-Net folder: its scale is fixed at 1 (got "
                             f"{recipe.lora_scale}); pass the LoRA file itself to scale it")
        if self.student is not None and recipe.t_start is not None:
            raise ValueError("multi-step denoising (t_start) is for the noisy baseline only: a CleanDIFT student "
                             "sees the clean latent in one pass; drop t_start from the recipe")

    def unet_for(self, recipe: GateRecipe) -> torch.nn.Module:
        if recipe.lora in self.merged:
            select_lora(self.unet, None, 1.0)
            return self.merged[recipe.lora]
        select_lora(self.unet, recipe.lora, recipe.lora_scale)
        return self.unet

    def _prompt(self, recipe: GateRecipe, category: str) -> torch.Tensor:
        return self.base.encode_prompt(recipe.prompt_for(category)).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def extract(self, image, recipe: GateRecipe, category: str = "", conv: bool = True,
                attention: bool = False) -> dict[str, torch.Tensor]:
        """Native-resolution maps of one image (``C x h x w`` each, float32 on the CPU): the conv parts
        (``CONV_PARTS``) and/or the per-block averaged attention maps (``ATTENTION_PARTS``)."""
        if not (conv or attention):
            raise ValueError("nothing to extract: ask for conv and/or attention features")
        self.check(recipe)
        pixels = prepare_images([image], self.size, "stretch").pixels
        embeds = self._prompt(recipe, category)
        unet = self.unet_for(recipe)
        control = None
        if recipe.controlnet is not None:
            control = canny_control(pixels).to(device=self.device, dtype=self.dtype)
        pixels = pixels.to(device=self.device, dtype=self.dtype)

        def residuals(x: torch.Tensor, t) -> dict:
            if control is None:
                return {}
            down, mid = self.controlnets[recipe.controlnet](x, t, encoder_hidden_states=embeds, controlnet_cond=control,
                                                           conditioning_scale=recipe.controlnet_scale, return_dict=False)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        if self.student is not None:
            x, t = self.base.encode_images(pixels), self.student.timestep
        else:
            x, t = self._denoised_latent(pixels, recipe, unet, embeds, residuals), recipe.t
        out = unet_capture(unet, x, t, embeds, taps=CONV_TAPS if conv else (), modules=(BLOCK3,) if conv else (),
                           attention_probs=self.attention_layers if attention else (), **residuals(x, t))
        parts = {k: out[k][0] for k in CONV_PARTS} if conv else {}
        if attention:
            h, w = self.size
            for block in ATTENTION_BLOCKS:
                stride = TAP_TABLE[attention_tap(block)].stride
                maps = [out[p][0] for p in self.attention_layers if p.startswith(f"up_blocks.{block}.")]
                mean = torch.stack(maps).mean(0)  # N x L, N = (h / stride) * (w / stride)
                parts[attention_key(block)] = mean.T.reshape(-1, h // stride, w // stride)
        return {k: v.float().cpu() for k, v in parts.items()}

    def _denoised_latent(self, pixels, recipe: GateRecipe, unet, embeds, residuals) -> torch.Tensor:
        """img2img noising at ``t_start or t`` (seeded), then one DDIM step per timestep down to ``t``."""
        gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
        dist = self.base.vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen).to(self.device, self.dtype)
        latent = (dist.mean + dist.std * eps) * self.base.scaling_factor
        noise = torch.randn(latent.shape, generator=gen).to(self.device, self.dtype)
        start = recipe.t if recipe.t_start is None else recipe.t_start
        x = self.scheduler.add_noise(latent, noise, torch.tensor([start]))
        for t in range(start, recipe.t, -1):
            eps_pred = unet(x, t, encoder_hidden_states=embeds, return_dict=False, **residuals(x, t))[0]
            x = self.scheduler.step(eps_pred, t, x).prev_sample.to(self.dtype)
        return x

    def features(self, image, recipe: GateRecipe, category: str = "", kind: str = "conv") -> torch.Tensor:
        """One feature on the common grid: ``kind`` "conv" (``[C, gh, gw]``) or "attention" (``[154, gh, gw]``)."""
        if kind not in ("conv", "attention"):
            raise ValueError(f"feature kind must be 'conv' or 'attention', got {kind!r}")
        parts = self.extract(image, recipe, category, conv=kind == "conv", attention=kind == "attention")
        return conv_feature(parts, self.grid) if kind == "conv" else attention_feature(parts, self.grid)
