"""Base Stable Diffusion models from local disk, the tiny test model, and the release's student formats.

Base models load from a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) or a single original-format ``.safetensors`` file, never from a hub and never from
a pickle. Students are read and written in both formats of the public release (SPEC section 4):
``_unet`` (the student U-Net alone, diffusers keys) and ``_full`` (aligner state dict).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import configs
from ..checkpoint import check_state_dict, read_safetensors, read_safetensors_metadata, write_safetensors
from .heads import HEAD_PREFIXES, ProjectionHeads

DEFAULT_STUDENT_TIMESTEP = 261.0
STUDENT_PREFIX = "unet_feature_extractor_cleandift."
TEACHER_PREFIX = "unet_feature_extractor_base."
VAE_PREFIX = "ae."
VAE_DOWNSCALE = 8


def _diffusers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: fail at once instead of timing out
    import diffusers

    return diffusers


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


@dataclass
class BaseModel:
    """A Stable Diffusion base model: the parts CleanDIFT uses (no decoder-side pipeline)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None
    tokenizer: object | None
    alphas_cumprod: torch.Tensor
    source: str
    variant: str = "custom"
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @property
    def resolution(self) -> int:
        """Native image size in pixels (768 for SD 2.1, 512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * VAE_DOWNSCALE

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def block_out_channels(self) -> list[int]:
        return list(self.unet.config.block_out_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Text-encoder hidden states ``[B, 77, D]`` as the SD pipelines compute them (cached per prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"base model {self.source} has no text encoder/tokenizer: pass prompt embeddings "
                             "explicitly or use a diffusers folder with text_encoder/ and tokenizer/")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
            for p, h in zip(missing, hidden):
                self._prompt_cache[p] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] ``B x 3 x H x W`` -> latents times the VAE scaling factor.

        The posterior mean by default (deterministic, what an engine wants); ``sample=True`` draws
        from the posterior as training does.
        """
        dist = self.vae.encode(images).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return latents * self.scaling_factor

    def to(self, device=None, dtype=None) -> "BaseModel":
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                move_module(m, device, dtype)
        self._prompt_cache.clear()
        return self


def move_module(module: nn.Module, device=None, dtype=None) -> nn.Module:
    """``module.to`` that skips the no-op casts diffusers warns about."""
    p = next(module.parameters(), None)
    if p is None:
        return module
    if device is not None and p.device != torch.device(device):
        module.to(device=device)
    if dtype is not None and p.dtype != dtype:
        module.to(dtype=dtype)
    return module


def detect_variant(unet_config) -> str:
    """``sd21``/``sd15``/``tiny`` when the U-Net config matches one of ours, else ``custom``."""
    for name, ref in configs.UNET.items():
        if all(_config_value(unet_config, k) == _normalise(v) for k, v in ref.items()
               if k in ("block_out_channels", "cross_attention_dim", "use_linear_projection", "attention_head_dim")):
            return name
    return "custom"


def _normalise(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _config_value(config, key):
    value = config[key] if isinstance(config, dict) else getattr(config, key)
    return _normalise(value)


def _alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    diffusers = _diffusers()
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = diffusers.DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
    return sched.alphas_cumprod.clone()


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
        from .single_file import load_single_file

        base = load_single_file(path, text_encoder=text_encoder, tokenizer=tokenizer)
    else:
        raise FileNotFoundError(f"base model {path} does not exist (expected a diffusers folder or a .safetensors file)")
    base.to(device=device, dtype=dtype)
    for m in (base.unet, base.vae, base.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    return base


def _load_diffusers_folder(path: Path, text_encoder: bool) -> BaseModel:
    diffusers, transformers = _diffusers(), _transformers()
    for part in ("unet", "vae"):
        if not (path / part / "config.json").is_file():
            raise ValueError(f"{path} is not a diffusers model folder: {part}/config.json is missing "
                             "(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    kwargs = dict(local_files_only=True, use_safetensors=True)
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise ValueError(f"cannot load {path}: {exc}. Weights must be .safetensors (pickled .bin files are "
                         "not loaded); convert them with diffusers' save_pretrained(safe_serialization=True)") from None
    te = tok = None
    if text_encoder and (path / "text_encoder").is_dir():
        te = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        tok = transformers.AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched_config = json.loads(sched_file.read_text()) if sched_file.is_file() else dict(configs.SCHEDULER)
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tok, alphas_cumprod=_alphas_cumprod(sched_config),
                     source=str(path), variant=detect_variant(unet.config))


# ---------------------------------------------------------------------------------------------
# The tiny model


def _byte_level_vocab() -> dict[str, int]:
    """The 256 GPT-2 byte-to-unicode characters, the same with ``</w>``, and CLIP's two specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def build_tiny_tokenizer(folder: Path, pad_token: str):
    """A real CLIP BPE tokenizer with a byte-level vocabulary and no merges: builds offline."""
    transformers = _transformers()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77, pad_token=pad_token)


def build_models(variant: str, seed: int = 0):
    """Randomly initialised U-Net, VAE and text encoder of a configuration (tokenizer not included)."""
    diffusers, transformers = _diffusers(), _transformers()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**configs.unet_config(variant))
    vae = diffusers.AutoencoderKL(**configs.vae_config(variant))
    te_config = configs.text_encoder_config(variant)
    if "vocab_size" not in te_config:  # tiny: the byte-level tokenizer's vocabulary and specials
        vocab = _byte_level_vocab()
        te_config.update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_config))
    return unet, vae, text_encoder


def write_tiny_base(path: str | Path, seed: int = 0, variant: str = "tiny") -> Path:
    """Write a complete tiny base model (SD 2.1 topology by default) as a diffusers folder.

    Tests, the demo and users' smoke tests start from it; it goes through exactly the loading,
    training and export code that real SD weights go through.
    """
    if not variant.startswith("tiny"):
        raise ValueError(f"write_tiny_base writes tiny variants only, not {variant!r}")
    path = Path(path)
    unet, vae, text_encoder = build_models(variant, seed)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    # SD 2.x tokenizers pad with "!", SD 1.x with the end token: the tiny ones follow their topology.
    pad = "!" if configs.UNET[variant]["use_linear_projection"] else "<|endoftext|>"
    tokenizer = build_tiny_tokenizer(path / "tokenizer_src", pad_token=pad)
    tokenizer.save_pretrained(path / "tokenizer")
    for leftover in (path / "tokenizer_src").iterdir():
        leftover.unlink()
    (path / "tokenizer_src").rmdir()
    diffusers = _diffusers()
    diffusers.DDIMScheduler(**configs.SCHEDULER).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "cleandift_variant": variant}, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Students in the release formats


@dataclass
class Student:
    """A CleanDIFT student: the fine-tuned U-Net, its timestep, and the heads when the file had them."""

    unet: nn.Module
    timestep: float = DEFAULT_STUDENT_TIMESTEP
    heads: ProjectionHeads | None = None
    source: str = ""


def save_student_unet(path: str | Path, unet: nn.Module, timestep: float = DEFAULT_STUDENT_TIMESTEP) -> None:
    """The release ``_unet`` format: the student U-Net alone in diffusers key names.

    Loads strictly into ``UNet2DConditionModel``; the U-Net config and the timestep travel in the
    safetensors metadata so the file is self-describing (the release's own files lack both).
    """
    write_safetensors(path, unet.state_dict(), metadata={
        "format": "cleandift_unet", "unet_config": unet_config_json(unet), "timestep": str(float(timestep))})


def save_student_full(path: str | Path, unet: nn.Module, heads: ProjectionHeads, timestep: float | torch.Tensor,
                      teacher: nn.Module | None = None, vae: nn.Module | None = None) -> None:
    """The release ``_full`` format: aligner state dict with student, heads, mapping, timestep (and teacher, VAE)."""
    state: dict[str, torch.Tensor] = {}
    state.update({STUDENT_PREFIX + k: v for k, v in unet.state_dict().items()})
    state.update(heads.release_state_dict())
    state["timestep"] = torch.as_tensor(timestep, dtype=torch.float32).detach().reshape(())
    if teacher is not None:
        state.update({TEACHER_PREFIX + k: v for k, v in teacher.state_dict().items()})
    if vae is not None:
        state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    write_safetensors(path, state, metadata={"format": "cleandift_full", "unet_config": unet_config_json(unet)})


def unet_config_json(unet: nn.Module) -> str:
    """The U-Net's constructor arguments as JSON (diffusers' private ``_*`` entries dropped)."""
    return json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")})


def load_student(path: str | Path, base: BaseModel | None = None) -> Student:
    """Read a student in either release format (detected from its keys).

    The U-Net architecture comes from the file's metadata when we wrote it, else from ``base``
    (the release's files carry no config). Keys are checked strictly against that architecture.
    """
    path = Path(path)
    state = read_safetensors(path)
    meta = read_safetensors_metadata(path)
    is_full = any(k.startswith(STUDENT_PREFIX) for k in state)
    if is_full:
        unet_state = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
        timestep = float(state["timestep"].reshape(-1)[0]) if "timestep" in state else DEFAULT_STUDENT_TIMESTEP
        heads = ProjectionHeads.from_state_dict(state, str(path)) if any(k.startswith(HEAD_PREFIXES) for k in state) else None
        known = (STUDENT_PREFIX, TEACHER_PREFIX, VAE_PREFIX, *HEAD_PREFIXES)
        stray = [k for k in state if not k.startswith(known) and k != "timestep"]
        if stray:
            raise ValueError(f"{path} has keys that belong to no part of a '_full' release file: {stray[:5]}")
    else:
        if any(k.startswith(HEAD_PREFIXES) for k in state):
            raise ValueError(f"{path} holds projection heads but no '{STUDENT_PREFIX}*' U-Net keys: not a student file")
        unet_state, heads = state, None
        timestep = float(meta.get("timestep", DEFAULT_STUDENT_TIMESTEP))
    unet = _student_unet_skeleton(path, meta, base)
    check_state_dict(unet.state_dict(), unet_state, f"student U-Net in {path}")
    unet.load_state_dict(unet_state, strict=True)
    unet.eval().requires_grad_(False)
    return Student(unet=unet, timestep=timestep, heads=heads, source=str(path))


def _student_unet_skeleton(path: Path, meta: dict, base: BaseModel | None) -> nn.Module:
    diffusers = _diffusers()
    if "unet_config" in meta:
        config = {k: v for k, v in json.loads(meta["unet_config"]).items() if not k.startswith("_")}
        return diffusers.UNet2DConditionModel(**config)
    if base is not None:
        return diffusers.UNet2DConditionModel.from_config(base.unet.config)
    raise ValueError(f"{path} carries no U-Net config (a file of the public release): pass the base model "
                     "it was trained from (base=PATH) so its architecture is known")
