"""Engine-file metadata is untrusted: every field typed and bounded before a runtime uses it.

The runtimes size buffers from these fields (the TensorRT backend allocates batch x tokens x
width for the prompt embeddings and batch x C x h x w per tap), bake the timestep into
features, and build the output view of each tap from its channels and stride. A corrupted or
hostile ``.onnx`` / ``.plan`` must therefore fail here, naming the field, and never reach an
allocation, a NaN timestep or a view of the wrong shape.
"""

from __future__ import annotations

import math

from ..conditioning import check_text_conditioning
from ..features.preprocess import RESIZE_POLICIES, SIZE_MULTIPLE
from ..models.fast_encoder import check_engine_record
from ..taps import TAP_TABLE, TAPS
from ..timesteps import check_timestep
from .quantized import check_precision_record

MAX_SIDE = 8192
MAX_BATCH = 1024
MAX_CHANNELS = 8192
MAX_TOKENS = 1024
MAX_TEXT = 10_000


def _int(value, lo: int, hi: int, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{source}: metadata field {field} = {value!r:.60} must be an integer in [{lo}, {hi}] "
                         "(corrupt or foreign file: re-export it)")
    return value


def _side(value, field: str, source: str) -> int:
    _int(value, SIZE_MULTIPLE, MAX_SIDE, field, source)
    if value % SIZE_MULTIPLE:
        raise ValueError(f"{source}: metadata field {field} = {value} is not a multiple of {SIZE_MULTIPLE}")
    return value


def _pair(value, field: str, source: str) -> list:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{source}: metadata field {field} = {value!r:.60} must be a pair [a, b]")
    return value


def check_artifact_fields(info, source: str) -> None:
    """Raise a ValueError naming the first malformed or out-of-range field of ``info`` (ArtifactInfo)."""
    if not isinstance(info.block_out_channels, list) or len(info.block_out_channels) != 4:
        raise ValueError(f"{source}: metadata field block_out_channels = {info.block_out_channels!r:.60} must list "
                         "the 4 block widths of an SD U-Net")
    for i, c in enumerate(info.block_out_channels):
        _int(c, 1, MAX_CHANNELS, f"block_out_channels[{i}]", source)
    if not isinstance(info.taps, list) or not 1 <= len(info.taps) <= len(TAPS):
        raise ValueError(f"{source}: metadata field taps must list 1 to {len(TAPS)} taps")
    names = []
    for entry in info.taps:
        if not isinstance(entry, dict) or entry.get("name") not in TAP_TABLE:
            raise ValueError(f"{source} declares an unknown tap {entry!r:.60} (valid: {', '.join(TAPS)})")
        tap = TAP_TABLE[entry["name"]]
        expected = {"module": tap.module, "channels": tap.channels(info.block_out_channels), "stride": tap.stride}
        wrong = {k: entry.get(k) for k, v in expected.items() if entry.get(k) != v}
        if wrong:
            raise ValueError(f"{source}: tap {tap.name} is recorded as {wrong}, the tap table and the block widths say "
                             f"{ {k: expected[k] for k in wrong} } (corrupt file: re-export it)")
        names.append(tap.name)
    if len(set(names)) != len(names) or names != [t for t in TAPS if t in names]:
        raise ValueError(f"{source}: metadata taps {names} repeat or are out of table order")
    if (info.height is None) != (info.width is None) or (info.height is None) == (info.size_range is None):
        raise ValueError(f"{source}: metadata must give either a fixed height and width or a size_range")
    if info.height is not None:
        _side(info.height, "height", source), _side(info.width, "width", source)
        allowed = (info.height, info.width)
    else:
        lo, hi = _pair(info.size_range, "size_range", source)
        _side(lo, "size_range[0]", source), _side(hi, "size_range[1]", source)
        if lo > hi:
            raise ValueError(f"{source}: metadata size_range [{lo}, {hi}] is empty")
        allowed = None
    dh, dw = _pair(info.default_size, "default_size", source)
    _side(dh, "default_size[0]", source), _side(dw, "default_size[1]", source)
    if allowed is not None and (dh, dw) != allowed:
        raise ValueError(f"{source}: metadata default_size {[dh, dw]} differs from the fixed size {list(allowed)}")
    if allowed is None and not (info.size_range[0] <= min(dh, dw) and max(dh, dw) <= info.size_range[1]):
        raise ValueError(f"{source}: metadata default_size {[dh, dw]} lies outside size_range {info.size_range}")
    if info.resize not in RESIZE_POLICIES:
        raise ValueError(f"{source}: metadata resize {info.resize!r:.40} is not one of {', '.join(RESIZE_POLICIES)}")
    batch = info.batch
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: metadata field batch must be an object with min, opt, max")
    lo = _int(batch.get("min"), 1, MAX_BATCH, "batch.min", source)
    opt = _int(batch.get("opt"), 1, MAX_BATCH, "batch.opt", source)
    hi = batch.get("max")
    if hi is not None:
        _int(hi, 1, MAX_BATCH, "batch.max", source)
    if not lo <= opt <= (hi if hi is not None else opt):
        raise ValueError(f"{source}: metadata batch range {batch} is not min <= opt <= max")
    check_timestep(info.timestep, f"{source}: metadata timestep")
    _int(info.cross_attention_dim, 1, MAX_CHANNELS, "cross_attention_dim", source)
    _int(info.prompt_tokens, 1, MAX_TOKENS, "prompt_tokens", source)
    if isinstance(info.scaling_factor, bool) or not isinstance(info.scaling_factor, (int, float)) or not (
            math.isfinite(info.scaling_factor) and 0 < info.scaling_factor <= 100):
        raise ValueError(f"{source}: metadata scaling_factor {info.scaling_factor!r:.40} must be a positive number")
    for field in ("base_model", "variant", "student", "prompt"):
        value = getattr(info, field)
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ValueError(f"{source}: metadata field {field} must be a string of at most {MAX_TEXT} characters")
    if info.text_conditioning is not None:
        check_text_conditioning(info.text_conditioning, f"{source}: metadata text_conditioning")
    check_engine_record(info.encoder, source)
    if not isinstance(info.extra, dict):
        raise ValueError(f"{source}: metadata field extra must be an object")
    check_precision_record(info.extra, source)
