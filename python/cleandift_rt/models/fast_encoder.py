"""Fast image encoders: a small network in place of the base VAE's encoder (diffusers ``AutoencoderTiny``,
the architecture of TAESD), trained to give the latents the engine feeds the U-Net.

What the engine feeds the U-Net is the base VAE's posterior mean times its scaling factor; a fast
encoder computes ``(encoder(pixels) - shift_factor) * scaling_factor`` of its ``AutoencoderTiny``
config (TAESD's latents are already on that scale: factor 1, shift 0), pixels in [-1, 1].

A fast-encoder folder is a diffusers ``AutoencoderTiny`` folder (``config.json``,
``diffusion_pytorch_model.safetensors``: ``AutoencoderTiny.from_pretrained`` reads it) plus
``cleandift_encoder.json``, the record ``cleandift-rt distill-encoder`` writes: the encoder's weight
hash, the base VAE it imitates (its weight hash, scaling factor, latent channels), where it started
(``--init``) and its held-out latent error before and after. Only folders with that record load
here: the error on the user's images is measured before an encoder is used, never assumed.

Pairing rules (``check_pairing``): latent channels and the scaling factor of the imitated VAE must
be the base's (refused otherwise, both named); another VAE with the same scale is a warning. A
student adapted to an encoder records its name and hash (``encoder_reference``);
``pairing_warning`` says when a student runs with another encoder than the one it was adapted to.

Config files are untrusted: the config is bounded, the model built on the meta device and compared
with the weight file's header before any memory is allocated; weights are safetensors only.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..build_info import _package_version
from ..checkpoint import (atomic_write_bytes, check_state_dict, read_safetensors, read_safetensors_shapes,
                          tensor_fingerprint)
from ..checks import read_json_file
from .base import VAE_DOWNSCALE, BaseModel
from .offline import diffusers

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
RECORD_FILE = "cleandift_encoder.json"
FORMAT = "cleandift-fast-encoder"
ARCHITECTURE = "AutoencoderTiny"
MAX_WIDTH = 1024  # TAESD: 64
MAX_BLOCKS = 16  # TAESD: 3 per level
MAX_LATENT_CHANNELS = 64  # SD: 4, SD3 / FLUX: 16
MAX_TEXT = 256
_HASH = re.compile(r"^[0-9a-f]{16,64}$")
DISTILL_COMMAND = "cleandift-rt distill-encoder --base BASE --data IMAGES --out DIR"


class FastEncoder(nn.Module):
    """Pixels ``B x 3 x H x W`` in [-1, 1] -> latents ``B x C x H/8 x W/8`` on the base's scaled-latent
    scale, from an ``AutoencoderTiny``'s encoder. ``record``: the folder's ``cleandift_encoder.json``."""

    def __init__(self, autoencoder: nn.Module, record: dict | None = None, source: str = ""):
        super().__init__()
        self.encoder = autoencoder.encoder
        self.scaling_factor = float(autoencoder.config.scaling_factor)
        self.shift_factor = float(getattr(autoencoder.config, "shift_factor", 0.0) or 0.0)
        self.latent_channels = int(autoencoder.config.latent_channels)
        self.autoencoder_config = {k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")}
        self.record = record or {}
        self.source = source

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.encoder(pixels)
        if self.shift_factor:
            latents = latents - self.shift_factor
        return latents * self.scaling_factor if self.scaling_factor != 1.0 else latents

    @property
    def name(self) -> str:
        return Path(self.source).name if self.source else "fast encoder"

    @property
    def identity(self) -> str:
        """The hash of the encoder's weights (the decoder's are not part of it)."""
        return encoder_hash(self.encoder)

    def reference(self) -> dict:
        """What a student file records of the encoder it was adapted to: ``{"name", "hash"}``."""
        return {"name": self.name, "hash": self.identity}

    def describe(self) -> dict:
        """The engine-file record of this encoder (``ArtifactInfo.encoder``, ``Engine.info["encoder"]``)."""
        training = self.record.get("training") or {}
        error = (training.get("val_latent_error") or {}).get("final")
        return {"kind": "fast", "architecture": ARCHITECTURE, "name": self.name, "hash": self.identity,
                "parameters": sum(p.numel() for p in self.encoder.parameters()),
                "imitates": dict(self.record.get("base") or {}), "val_latent_error": error}


def encoder_hash(encoder: nn.Module) -> str:
    return tensor_fingerprint(encoder.state_dict())


def vae_hash(base: BaseModel) -> str:
    """The identity of the base VAE a fast encoder imitates (its weights)."""
    return tensor_fingerprint(base.vae.state_dict())


def base_reference(base: BaseModel) -> dict:
    """What a fast encoder's record keeps of the base VAE it imitates."""
    return {"name": Path(base.source).name, "vae_hash": vae_hash(base), "scaling_factor": base.scaling_factor,
            "latent_channels": int(base.vae.config.latent_channels)}


# -- the AutoencoderTiny config and weights ------------------------------------------------------


def new_autoencoder(latent_channels: int = 4, width: int | None = None, blocks=None, seed: int = 0) -> nn.Module:
    """A freshly initialised ``AutoencoderTiny``: TAESD's architecture (64 channels, 1 + 3 + 3 + 3 blocks)
    unless ``width`` / ``blocks`` (encoder blocks per level; the decoder mirrors them) say otherwise."""
    config: dict = {"latent_channels": latent_channels}
    if width is not None:
        config["encoder_block_out_channels"] = config["decoder_block_out_channels"] = [width] * 4
    if blocks is not None:
        config["num_encoder_blocks"], config["num_decoder_blocks"] = list(blocks), list(blocks)[::-1]
    check_config(config, "the new encoder")
    torch.manual_seed(seed)
    return diffusers().AutoencoderTiny(**config).eval()


def check_config(config, source: str) -> dict:
    """An ``AutoencoderTiny`` config as constructor arguments within bounds, or a ValueError naming the key."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: config.json must be a JSON object, got {type(config).__name__}")
    if config.get("_class_name", ARCHITECTURE) != ARCHITECTURE:
        raise ValueError(f"{source} holds a {config['_class_name']!r:.40}, not an {ARCHITECTURE}: a fast encoder is "
                         "a diffusers AutoencoderTiny folder (TAESD's architecture)")
    allowed = set(inspect.signature(diffusers().AutoencoderTiny.__init__).parameters) - {"self"}
    # block_out_channels: AutoencoderTiny registers it itself (the decoder's widths); never an argument
    config = {k: v for k, v in config.items() if not str(k).startswith("_") and k != "block_out_channels"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{source}: config.json has keys AutoencoderTiny does not take: {unknown[:5]}")
    for key, value in config.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(value) > 8:
            raise ValueError(f"{source}: config.json {key} has {len(value)} entries (at most 8)")
        for item in items:
            if item is None or isinstance(item, bool) or isinstance(item, str) and len(item) <= MAX_TEXT:
                continue
            if not isinstance(item, (int, float)) or not math.isfinite(item) or abs(item) > 1e4:
                raise ValueError(f"{source}: config.json {key} = {value!r:.60} is not a plausible value")
    for key, hi in (("encoder_block_out_channels", MAX_WIDTH), ("decoder_block_out_channels", MAX_WIDTH),
                    ("num_encoder_blocks", MAX_BLOCKS), ("num_decoder_blocks", MAX_BLOCKS)):
        value = config.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi for v in value)):
            raise ValueError(f"{source}: config.json {key} {value!r:.60} must list integers in [0, {hi}]")
    widths = config.get("encoder_block_out_channels", [64] * 4)
    levels = len(config.get("num_encoder_blocks", [1, 3, 3, 3]))
    if len(widths) != levels or len(set(widths)) != 1 or 2 ** (levels - 1) != VAE_DOWNSCALE:
        raise ValueError(f"{source}: the encoder must have 4 levels of one width (it downsamples by "
                         f"{VAE_DOWNSCALE}, like the VAE): encoder_block_out_channels {widths}, {levels} levels")
    channels = config.get("latent_channels", 4)
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_LATENT_CHANNELS:
        raise ValueError(f"{source}: config.json latent_channels {channels!r:.40} must be in "
                         f"[1, {MAX_LATENT_CHANNELS}]")
    for key, default, lowest in (("scaling_factor", 1.0, "a positive"), ("shift_factor", 0.0, "a")):
        value = config.get(key, default)
        if value is None and key == "shift_factor":  # diffusers reads null as no shift
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (key == "scaling_factor" and value <= 0):
            raise ValueError(f"{source}: config.json {key} {value!r:.40} must be {lowest} number")
    return config


def read_autoencoder(folder: str | Path, what: str = "fast encoder") -> nn.Module:
    """The ``AutoencoderTiny`` of a diffusers folder: config checked, built on the meta device and
    compared with the weights' header, then loaded (safetensors only, finite)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder {folder} does not exist: give a diffusers AutoencoderTiny folder "
                                f"(config.json, {WEIGHTS_FILE}), e.g. one written by {DISTILL_COMMAND}")
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file: give the folder holding config.json and {WEIGHTS_FILE}")
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise ValueError(f"{what} folder {folder} has no {CONFIG_FILE}: not a diffusers AutoencoderTiny folder")
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = (f" (it has {pickled[0]}, a pickle, which is never loaded: convert it with "
                "AutoencoderTiny.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True) where you trust "
                "it)") if pickled else ""
        raise ValueError(f"{what} folder {folder} has no {WEIGHTS_FILE}{hint}")
    source = str(folder)
    config = check_config(read_json_file(config_path, f"{what} config {config_path}"), source)
    try:
        with torch.device("meta"):
            skeleton = diffusers().AutoencoderTiny(**config)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"{source}: config.json does not describe a buildable AutoencoderTiny ({exc})") from None
    got = {k: torch.empty(tuple(s), device="meta") for k, s in read_safetensors_shapes(weights).items()}
    check_state_dict(skeleton.state_dict(), got, f"{what} weights {weights}")
    model = diffusers().AutoencoderTiny(**config)
    model.load_state_dict(read_safetensors(weights), strict=True)
    return model.eval().requires_grad_(False)


# -- our folders: weights, config and the record ------------------------------------------------


def save_fast_encoder(out: str | Path, autoencoder: nn.Module, record: dict) -> Path:
    """Write ``out`` as a diffusers ``AutoencoderTiny`` folder plus its record, each file atomically; the
    record last (a folder without it is not loaded). ``record`` gains format, architecture, hash and the
    package version."""
    from ..checkpoint import write_safetensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(autoencoder.to_json_string())
    payload = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(out / CONFIG_FILE, lambda tmp: Path(tmp).write_bytes(payload))
    write_safetensors(out / WEIGHTS_FILE, autoencoder.state_dict(), {"format": "pt"})
    full = {"format": FORMAT, "architecture": ARCHITECTURE, "hash": encoder_hash(autoencoder.encoder),
            "latent_channels": int(autoencoder.config.latent_channels), **record,
            "package_version": _package_version()}
    text = (json.dumps(full, indent=2) + "\n").encode()
    atomic_write_bytes(out / RECORD_FILE, lambda tmp: Path(tmp).write_bytes(text))
    return out


def is_fast_encoder_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / RECORD_FILE).is_file()


def read_record(folder: str | Path) -> dict:
    """The ``cleandift_encoder.json`` of a fast-encoder folder, checked (a raw TAESD folder is named)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"fast encoder folder {folder} does not exist: make one with {DISTILL_COMMAND} "
                                "(--init taesd/ --steps 0 records public TAESD weights as they are)")
    if not folder.is_dir():
        raise ValueError(f"fast encoder {folder} is a file: give the folder {DISTILL_COMMAND} wrote")
    path = folder / RECORD_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {RECORD_FILE}: it was not measured on your images. Record it first with "
                         f"cleandift-rt distill-encoder --base BASE --data IMAGES --init {folder} --steps 0 --out DIR "
                         "(or train it: --steps N)")
    record = read_json_file(path, f"fast encoder record {path}")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fast encoder record (format {FORMAT!r} expected): rewrite it with "
                         "cleandift-rt distill-encoder")
    base = record.get("base")
    if not isinstance(base, dict):
        raise ValueError(f"{path} does not say which base VAE the encoder imitates (no 'base' object)")
    check_reference(record, f"{path}")
    scale = base.get("scaling_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{path}: base.scaling_factor {scale!r:.40} must be a positive number")
    channels = base.get("latent_channels")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_LATENT_CHANNELS:
        raise ValueError(f"{path}: base.latent_channels {channels!r:.40} must be in [1, {MAX_LATENT_CHANNELS}]")
    return record


def load_fast_encoder(folder: str | Path) -> FastEncoder:
    """A fast-encoder folder written by ``distill-encoder``: weights checked against their record."""
    if isinstance(folder, FastEncoder):
        return folder
    record = read_record(folder)
    encoder = FastEncoder(read_autoencoder(folder), record, str(folder))
    if encoder.identity != record["hash"]:
        raise ValueError(f"{folder}: the encoder weights are not the ones its {RECORD_FILE} describes (replaced or "
                         f"edited after it was written): record them again with cleandift-rt distill-encoder "
                         f"--init {folder} --steps 0")
    return encoder


# -- pairing with a base model and a student ----------------------------------------------------


def check_pairing(encoder: FastEncoder, base: BaseModel) -> list[str]:
    """Refuse an encoder whose latents cannot be this base's (channels, scale); return warnings (another
    VAE of the same scale: its latents may differ)."""
    channels = int(base.vae.config.latent_channels)
    in_channels = int(base.unet.config.in_channels)
    if encoder.latent_channels != channels or encoder.latent_channels != in_channels:
        raise ValueError(f"fast encoder {encoder.name} gives {encoder.latent_channels} latent channels, base "
                         f"{Path(base.source).name} takes {in_channels} (its VAE {channels}): use an encoder for this "
                         f"model family, or distil one: {DISTILL_COMMAND}")
    imitated = encoder.record.get("base") or {}
    scale = float(imitated.get("scaling_factor", base.scaling_factor))
    if not math.isclose(scale, base.scaling_factor, rel_tol=1e-6):
        raise ValueError(f"fast encoder {encoder.name} imitates latents scaled by {scale:g} (the VAE of "
                         f"{imitated.get('name', '?')}), base {Path(base.source).name} scales its VAE's by "
                         f"{base.scaling_factor:g}: distil an encoder for this base ({DISTILL_COMMAND})")
    if imitated.get("vae_hash") not in (None, vae_hash(base)):
        return [f"fast encoder {encoder.name} was distilled from another VAE ({imitated.get('name', '?')}) than base "
                f"{Path(base.source).name}'s: its latents may differ; check with cleandift-rt compare on your images"]
    return []


def check_reference(value, source: str) -> dict | None:
    """An untrusted ``{"name", "hash"}`` (a student's adapted encoder, an engine file's encoder) or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: the encoder record must be an object with name and hash")
    name, digest = value.get("name", ""), value.get("hash")
    if not isinstance(name, str) or len(name) > MAX_TEXT:
        raise ValueError(f"{source}: the encoder name must be a string of at most {MAX_TEXT} characters")
    if not isinstance(digest, str) or not _HASH.match(digest):
        raise ValueError(f"{source}: the encoder hash {digest!r:.40} is not a hex digest (corrupt record)")
    return value


def check_engine_record(value, source: str) -> dict | None:
    """An engine file's untrusted ``encoder`` record (``FastEncoder.describe``), or None (the base VAE's)."""
    if value is None:
        return None
    check_reference(value, f"{source}: metadata encoder")
    if value.get("kind") != "fast" or value.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{source}: metadata encoder is of kind {value.get('kind')!r:.40} / architecture "
                         f"{value.get('architecture')!r:.40}; this cleandift-rt knows fast {ARCHITECTURE} encoders")
    count, error = value.get("parameters"), value.get("val_latent_error")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < 10**10:
        raise ValueError(f"{source}: metadata encoder parameters {count!r:.40} must be a positive integer")
    if error is not None and (isinstance(error, bool) or not isinstance(error, (int, float))
                              or not (math.isfinite(error) and error >= 0)):
        raise ValueError(f"{source}: metadata encoder val_latent_error {error!r:.40} must be a number >= 0")
    imitates = value.get("imitates", {})
    if not isinstance(imitates, dict) or len(imitates) > 8 or not all(
            isinstance(v, (str, int, float)) and len(str(v)) <= MAX_TEXT for v in imitates.values()):
        raise ValueError(f"{source}: metadata encoder imitates must be a small object of names and numbers")
    return value


def encoder_reference(encoder: FastEncoder | None) -> dict | None:
    """What a student file records of its encoder: None for the base VAE's."""
    return None if encoder is None else encoder.reference()


def pairing_warning(adapted: dict | None, encoder: FastEncoder | None, student: str) -> str | None:
    """Why a student adapted to ``adapted`` (None: the VAE) runs on the wrong encoder, or None."""
    running = encoder_reference(encoder)
    if (adapted or {}).get("hash") == (running or {}).get("hash"):
        return None
    was = f"fast encoder {adapted['name']} ({adapted['hash'][:12]})" if adapted else "the base VAE's encoder"
    now = f"fast encoder {running['name']} ({running['hash'][:12]})" if running else "the base VAE's encoder"
    fix = ("adapt it to this encoder (train/train.py ... --encoder DIR)" if running else
           "pass the encoder it was adapted to (encoder=DIR / --encoder DIR)")
    return f"student {student} was trained on latents of {was} but runs on {now}: its features may be worse; {fix}"


__all__ = ["FastEncoder", "new_autoencoder", "read_autoencoder", "save_fast_encoder", "load_fast_encoder",
           "read_record", "is_fast_encoder_folder", "check_pairing", "check_reference", "encoder_reference",
           "pairing_warning", "check_engine_record", "base_reference", "vae_hash", "encoder_hash", "RECORD_FILE"]
