"""Base models from a single original-format (CompVis/LDM) ``.safetensors`` checkpoint.

The weights are converted with diffusers' own LDM converters, without any hub access: the
architecture is recognised from tensor shapes and taken from ``configs``. Such files carry no
tokenizer vocabulary; the empty prompt (the default of every extractor) is still exact, because it
tokenizes to CLIP's fixed special tokens. Other prompts need a tokenizer folder (``tokenizer=``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import configs
from ..checkpoint import check_state_dict, read_safetensors
from .base import BaseModel, schedule_alphas_cumprod
from .build import build_models
from .offline import diffusers, transformers

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."


class EmptyPromptTokenizer:
    """Tokenizes exactly one prompt, ``""``: ``[BOS, EOS, PAD, ...]``; anything else is refused."""

    def __init__(self, bos: int, eos: int, pad: int, model_max_length: int = 77):
        self.bos, self.eos, self.pad, self.model_max_length = bos, eos, pad, model_max_length

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        other = [p for p in prompts if p != ""]
        if other:
            raise ValueError(f"this single-file checkpoint has no tokenizer vocabulary, so only the empty prompt works "
                             f"(got {other[0]!r}): pass tokenizer=DIR (a CLIP tokenizer folder such as the tokenizer/ "
                             "of a diffusers SD folder) or give prompt embeddings directly")
        length = max_length or self.model_max_length
        row = [self.bos, self.eos] + [self.pad] * (length - 2)

        class _Encoding:
            input_ids = torch.tensor([row] * len(prompts))

        return _Encoding()


def detect_single_file_variant(state: dict[str, torch.Tensor], source: str) -> str:
    """Which of our configurations an LDM checkpoint is, from tensor shapes alone."""
    def shape(key):
        t = state.get(UNET_PREFIX + key)
        return None if t is None else tuple(t.shape)

    conv_in = shape("input_blocks.0.0.weight")
    to_k = shape("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = shape("input_blocks.1.1.proj_in.weight")
    if conv_in is None or to_k is None or proj_in is None:
        raise ValueError(f"{source} is not an original-format Stable Diffusion 1.x/2.x checkpoint (no "
                         f"'{UNET_PREFIX}input_blocks.*' U-Net keys); for diffusers folders pass the folder")
    widths = [conv_in[0]] + [shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in (4, 7, 10)]
    found = dict(block_out_channels=widths, cross_attention_dim=to_k[1], use_linear_projection=len(proj_in) == 2)
    for name, ref in configs.UNET.items():
        if all(list(ref[k]) == v if isinstance(v, list) else ref[k] == v for k, v in found.items()):
            return name
    raise ValueError(f"{source}: unsupported U-Net {found}; known variants are {', '.join(configs.UNET)}")


def load_single_file(path: Path, text_encoder: bool = True, tokenizer: str | Path | None = None):
    diffusers()  # offline mode before diffusers is imported
    from diffusers.loaders import single_file_utils as sfu

    state = read_safetensors(path)
    variant = detect_single_file_variant(state, str(path))
    unet, vae, te = build_models(variant)
    _load_converted(unet, sfu.convert_ldm_unet_checkpoint(state, configs.unet_config(variant)), "U-Net", path)
    _load_converted(vae, sfu.convert_ldm_vae_checkpoint(state, configs.vae_config(variant)), "VAE", path)
    tok = None
    if not text_encoder:
        te = None
    elif any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        te_state = sfu.convert_open_clip_checkpoint(te, state, prefix=SD2_TEXT_PREFIX)
        # SD 2.x conditions on the penultimate OpenCLIP layer: diffusers' model has one layer fewer.
        n = te.config.num_hidden_layers
        te_state = {k: v for k, v in te_state.items() if not _layer_at_least(k, n)}
        _load_converted(te, te_state, "text encoder", path)
        tok = _tokenizer(tokenizer, te, pad_is_eos=False)
    elif any(k.startswith(SD1_TEXT_PREFIX) for k in state):
        te_state = {k[len(SD1_TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(SD1_TEXT_PREFIX)}
        te_state.pop("text_model.embeddings.position_ids", None)
        _load_converted(te, te_state, "text encoder", path)
        tok = _tokenizer(tokenizer, te, pad_is_eos=True)
    else:
        te = None
    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tok,
                     alphas_cumprod=schedule_alphas_cumprod(dict(configs.SCHEDULER)), source=str(path), variant=variant)


def _layer_at_least(key: str, n: int) -> bool:
    marker = "encoder.layers."
    if marker not in key:
        return False
    return int(key.split(marker, 1)[1].split(".", 1)[0]) >= n


def _text_keys_like(module, state: dict) -> dict:
    """Converted CLIP keys say ``text_model.*``; some transformers versions name them without the prefix."""
    expected = module.state_dict()
    prefix = "text_model."
    if any(k.startswith(prefix) for k in expected):
        return {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _load_converted(module, state, what: str, path: Path) -> None:
    if what == "text encoder":
        state = _text_keys_like(module, state)
    check_state_dict(module.state_dict(), state, f"{what} of {path}")
    module.load_state_dict(state, strict=True)


def _tokenizer(folder, text_encoder, pad_is_eos: bool):
    if folder is not None:
        return transformers().AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = int(text_encoder.config.vocab_size)
    bos, eos = vocab - 2, vocab - 1
    return EmptyPromptTokenizer(bos=bos, eos=eos, pad=eos if pad_is_eos else 0)
