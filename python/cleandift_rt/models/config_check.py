"""U-Net configurations read from files are untrusted: bounded and checked against the tensors first.

A student ``.safetensors`` we wrote carries its U-Net's constructor arguments in the metadata
(``unet_config``); a hostile or corrupted file could ask for ``layers_per_block=100000`` (minutes
and gigabytes before anything fails) or channels of 10^6 (a 16 TB allocation). ``checked_unet``
refuses such configs before any module exists:

1. structure and bounds: only ``UNet2DConditionModel`` arguments, plain JSON values, every integer
   within the limits below, block types diffusers knows, lists as long as the blocks;
2. consistency: the U-Net is built on PyTorch's ``meta`` device (no memory) and every parameter's
   shape is compared with the tensors the file holds (read from its header, no data loaded);
3. only then are the weights loaded, straight into that skeleton (``assign=True``, no random init).
"""

from __future__ import annotations

import inspect
import math
from typing import Mapping

import torch
from torch import nn

from ..checkpoint import check_state_dict
from .offline import diffusers

MAX_BLOCKS = 8  # SD has 4 down and 4 up blocks
MAX_LAYERS_PER_BLOCK = 16  # SD: 2
MAX_CHANNELS = 8192  # SD: 1280
MAX_SAMPLE_SIZE = 1024  # latent pixels (SD 2.1: 96)
MAX_LIST = 16
MAX_TEXT = 128
_COUNTS = ("layers_per_block", "transformer_layers_per_block", "reverse_transformer_layers_per_block")


def _known_block_types() -> set[str]:
    from diffusers.models.unets import unet_2d_blocks

    return {name for name in dir(unet_2d_blocks) if name.endswith(("Block2D", "Block2DCrossAttn"))}


def _ints(value) -> list:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _ints(item)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def _check_value(key: str, value, source: str, depth: int = 0) -> None:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ValueError(f"{source}: unet_config {key!r} is a {len(value)}-character string (corrupt metadata?)")
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > 1e6:
            raise ValueError(f"{source}: unet_config {key!r} = {value!r} is not a plausible number")
        return
    if isinstance(value, (list, tuple)) and depth < 2:
        if len(value) > MAX_LIST:
            raise ValueError(f"{source}: unet_config {key!r} has {len(value)} entries (at most {MAX_LIST})")
        for item in value:
            _check_value(key, item, source, depth + 1)
        return
    raise ValueError(f"{source}: unet_config {key!r} has an unsupported value of type {type(value).__name__}")


def check_unet_config(config, source: str) -> dict:
    """The config as a dict of ``UNet2DConditionModel`` arguments within bounds, or a ValueError naming the key."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: unet_config must be a JSON object, got {type(config).__name__}")
    allowed = set(inspect.signature(diffusers().UNet2DConditionModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if not str(k).startswith("_")}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{source}: unet_config has keys UNet2DConditionModel does not take: {unknown[:5]}")
    for key, value in config.items():
        _check_value(key, value, source)
    blocks = config.get("block_out_channels", [])
    if not isinstance(blocks, (list, tuple)) or not 1 <= len(blocks) <= MAX_BLOCKS or not all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS for c in blocks):
        raise ValueError(f"{source}: unet_config block_out_channels {blocks!r} must be 1 to {MAX_BLOCKS} channel "
                         f"counts in [1, {MAX_CHANNELS}]")
    for key in _COUNTS:
        if any(not 0 <= v <= MAX_LAYERS_PER_BLOCK for v in _ints(config.get(key))):
            raise ValueError(f"{source}: unet_config {key} {config[key]!r} outside [0, {MAX_LAYERS_PER_BLOCK}]")
    for key, value in config.items():
        if key not in _COUNTS and any(not 0 <= v <= MAX_CHANNELS for v in _ints(value)):
            raise ValueError(f"{source}: unet_config {key} {value!r} outside [0, {MAX_CHANNELS}]")
    if any(v > MAX_SAMPLE_SIZE for v in _ints(config.get("sample_size"))):
        raise ValueError(f"{source}: unet_config sample_size {config['sample_size']!r} above {MAX_SAMPLE_SIZE}")
    known = _known_block_types()
    for key in ("down_block_types", "up_block_types"):
        types = config.get(key)
        if types is None:
            continue
        if not isinstance(types, (list, tuple)) or len(types) != len(blocks) or any(t not in known for t in types):
            raise ValueError(f"{source}: unet_config {key} {types!r} must name {len(blocks)} diffusers blocks")
    return config


def checked_unet(config, tensor_shapes: Mapping[str, tuple], source: str) -> nn.Module:
    """A ``UNet2DConditionModel`` skeleton on the meta device whose parameters match ``tensor_shapes``."""
    config = check_unet_config(config, source)
    try:
        with torch.device("meta"):
            unet = diffusers().UNet2DConditionModel(**config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise ValueError(f"{source}: unet_config does not describe a buildable U-Net ({exc})") from None
    expected = unet.state_dict()
    got = {k: torch.empty(tuple(s), device="meta") for k, s in tensor_shapes.items()}
    check_state_dict(expected, got, f"student U-Net in {source}")
    return unet


def load_into(unet: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into a meta skeleton in place of its parameters; nothing may stay on meta."""
    unet.load_state_dict(dict(state), strict=True, assign=True)
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: the file does not hold {left[:3]} (incomplete checkpoint)")
    return unet
