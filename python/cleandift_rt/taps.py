"""The 11 feature taps of a Stable Diffusion U-Net decoder (docs/method.md, taps).

This table is the single source of truth: training, export, every runtime backend, the CLI and
the tests read tap names, module paths, channels and strides from here.

Within each up block the per-layer hidden state is taken after ``resnets[i]`` (then after
``attentions[i]`` when the block has attention); in a block with an upsampler the last layer's
entry is the upsampler output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Tap:
    name: str
    module: str  # diffusers module path inside UNet2DConditionModel
    channel_index: int  # index into unet.config.block_out_channels (up_blocks[i] has block_out_channels[3 - i])
    stride: int  # image pixels per feature pixel

    def channels(self, block_out_channels: Sequence[int]) -> int:
        return int(block_out_channels[self.channel_index])


_TAPS = (
    Tap("mid", "mid_block", 3, 64),
    Tap("us1", "up_blocks.0.resnets.0", 3, 64),
    Tap("us2", "up_blocks.0.resnets.1", 3, 64),
    Tap("us3", "up_blocks.0.upsamplers.0", 3, 32),
    Tap("us4", "up_blocks.1.attentions.0", 2, 32),
    Tap("us5", "up_blocks.1.attentions.1", 2, 32),
    Tap("us6", "up_blocks.1.upsamplers.0", 2, 16),
    Tap("us7", "up_blocks.2.attentions.0", 1, 16),
    Tap("us8", "up_blocks.2.attentions.1", 1, 16),
    Tap("us9", "up_blocks.2.upsamplers.0", 1, 8),
    Tap("us10", "up_blocks.3.attentions.0", 0, 8),
)

TAP_TABLE: dict[str, Tap] = {t.name: t for t in _TAPS}
TAPS: tuple[str, ...] = tuple(t.name for t in _TAPS)
DEFAULT_TAP = "us6"  # DIFT's up_ft_index=1, the usual choice for correspondence


def resolve_taps(taps: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validate a tap selection and return it in table order (all taps when ``None``)."""
    if taps is None:
        return TAPS
    if isinstance(taps, str):
        taps = [taps]
    requested = list(taps)
    if not requested:
        raise ValueError(f"empty tap selection: pass None for all taps or some of {', '.join(TAPS)}")
    unknown = [t for t in requested if t not in TAP_TABLE]
    if unknown:
        raise ValueError(f"unknown tap(s) {unknown}: valid taps are {', '.join(TAPS)}")
    chosen = set(requested)
    return tuple(t for t in TAPS if t in chosen)


def tap_channels(block_out_channels: Sequence[int]) -> dict[str, int]:
    """Channels of every tap for a U-Net with these ``block_out_channels``."""
    return {t.name: t.channels(block_out_channels) for t in _TAPS}


def tap_shape(name: str, block_out_channels: Sequence[int], height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of one tap for an image of ``height`` x ``width`` pixels (multiples of 64)."""
    tap = TAP_TABLE[name]
    return tap.channels(block_out_channels), height // tap.stride, width // tap.stride
