"""Models with random weights built from the configurations, and the tiny base model written to disk.

``build_models`` gives the skeleton of any variant (single-file loading fills it with converted
weights; benchmarks run it at SD 2.1 size). ``write_tiny_base`` writes a complete tiny model with
SD 2.1's topology as a diffusers folder: tests, the demo and users' smoke tests start from it, and
it goes through exactly the code real weights go through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import configs
from .offline import diffusers, transformers


def byte_level_vocab() -> dict[str, int]:
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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers().CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=77, pad_token=pad_token)


def build_models(variant: str, seed: int = 0):
    """Randomly initialised U-Net, VAE and text encoder of a configuration (tokenizer not included)."""
    torch.manual_seed(seed)
    unet = diffusers().UNet2DConditionModel(**configs.unet_config(variant))
    vae = diffusers().AutoencoderKL(**configs.vae_config(variant))
    te_config = configs.text_encoder_config(variant)
    if "vocab_size" not in te_config:  # tiny: the byte-level tokenizer's vocabulary and specials
        vocab = byte_level_vocab()
        te_config.update(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    text_encoder = transformers().CLIPTextModel(transformers().CLIPTextConfig(**te_config))
    return unet, vae, text_encoder


def write_tiny_base(path: str | Path, seed: int = 0, variant: str = "tiny") -> Path:
    """Write a complete tiny base model (SD 2.1 topology by default) as a diffusers folder.

    Tests, the demo and users' smoke tests start from it; it goes through exactly the loading,
    training and export code that real SD weights go through.
    """
    if not variant.startswith("tiny"):
        raise ValueError(f"write_tiny_base writes tiny variants only, not {variant!r}")
    return write_random_base(path, variant, seed)


def write_random_base(path: str | Path, variant: str, seed: int = 0) -> Path:
    """Write a base model of any variant's architecture with random weights (the benches' SD-size
    models: never downloaded) as a diffusers folder, with a byte-level tokenizer."""
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
    library = diffusers()
    library.DDIMScheduler(**configs.SCHEDULER).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": library.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "cleandift_variant": variant}, indent=2))
    return path
