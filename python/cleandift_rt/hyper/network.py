"""The aggregation network of Diffusion Hyperfeatures (docs/method.md, Diffusion Hyperfeatures; Luo et al. 2023).

Every feature map (one per layer and timestep) is resized bilinearly to the output grid, passed
through its layer's bottleneck block (one per layer, shared by that layer's timesteps) and
weighted by a softmax over all (layer, timestep) mixing weights; the descriptor is the sum.

The bottleneck is detectron2's ``BottleneckBlock``: 1x1 conv in -> 96, GroupNorm(32), ReLU; 3x3
conv 96 -> 96, GN, ReLU; 1x1 conv 96 -> 384, GN; shortcut 1x1 conv in -> 384 + GN (only when the
widths differ, as detectron2); ReLU(branch + shortcut). Convolutions have no bias and MSRA fill
(``kaiming_normal_``, fan_out, ReLU gain); GroupNorm starts at weight 1, bias 0. The mixing
weights start at 1: a uniform softmax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTION_DIM = 384
NORM_GROUPS = 32
OUTPUT_STRIDE = 8  # image pixels per descriptor cell: 64 x 64 at 512 px
MAX_LAYERS, MAX_TIMESTEPS = 64, 1000  # what a config read from a file may list


@dataclass(frozen=True)
class AggregationConfig:
    """What fixes the network's shape: its layers (names, channels, strides), S timesteps, widths.

    ``layers``: names of the feature maps' layers (our taps, e.g. ``us6``); ``channels`` and
    ``strides`` (image pixels per feature pixel) follow them; ``timesteps``: the label of each of
    the S maps per layer (a U-Net or head timestep); ``output_stride``: image pixels per
    descriptor cell; ``projection_dim``: descriptor channels (the bottleneck is a quarter).
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    timesteps: tuple[float, ...]
    projection_dim: int = PROJECTION_DIM
    output_stride: int = OUTPUT_STRIDE
    norm_groups: int = NORM_GROUPS

    def __post_init__(self):
        for name in ("layers", "channels", "strides", "timesteps"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"AggregationConfig.{name} must be a non-empty list, got {value!r:.60}")
            object.__setattr__(self, name, tuple(value))
        if not len(self.layers) == len(self.channels) == len(self.strides):
            raise ValueError(f"AggregationConfig: {len(self.layers)} layers but {len(self.channels)} channel counts and "
                             f"{len(self.strides)} strides")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"AggregationConfig: layers repeat: {list(self.layers)}")
        for name in ("channels", "strides", "projection_dim", "output_stride", "norm_groups"):
            values = getattr(self, name)
            for v in values if isinstance(values, tuple) else (values,):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"AggregationConfig.{name} must hold integers >= 1, got {v!r}")
        if self.bottleneck_dim * 4 != self.projection_dim or self.bottleneck_dim % self.norm_groups:
            raise ValueError(f"projection_dim {self.projection_dim} must be 4 x a multiple of the {self.norm_groups} "
                             f"GroupNorm groups (the bottleneck is a quarter of it), e.g. 384 or 128")
        for layer, stride in zip(self.layers, self.strides):
            ratio = max(stride, self.output_stride) / min(stride, self.output_stride)
            if ratio != int(ratio):
                raise ValueError(f"layer {layer}: stride {stride} and output_stride {self.output_stride} must divide "
                                 "one another (the resize is by a whole factor)")

    @property
    def bottleneck_dim(self) -> int:
        return self.projection_dim // 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> AggregationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not {"layers", "channels", "strides", "timesteps"} <= set(d):
            raise ValueError(f"{source}: aggregation config must give layers, channels, strides and timesteps")
        for name, most in (("layers", MAX_LAYERS), ("timesteps", MAX_TIMESTEPS)):  # one block per layer: bounded
            if isinstance(d[name], list) and len(d[name]) > most:
                raise ValueError(f"{source}: aggregation config lists {len(d[name])} {name}, more than {most}")
        return cls(**{k: v for k, v in d.items() if k in known})


def msra_fill(conv: nn.Conv2d) -> None:
    """detectron2's ``c2_msra_fill``: He normal with fan_out and the ReLU gain."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by GroupNorm (detectron2's ``Conv2d(..., norm=GN)``)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int):
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        msra_fill(conv)
        super().__init__(conv, nn.GroupNorm(groups, cout))


class BottleneckBlock(nn.Module):
    def __init__(self, in_channels: int, bottleneck: int, out_channels: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, groups) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, bottleneck, 1, groups)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, groups)
        self.conv3 = ConvNorm(bottleneck, out_channels, 1, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class AggregationNetwork(nn.Module):
    """``forward(maps) -> descriptors [B, projection_dim, H / output_stride, W / output_stride]``.

    ``maps``: one tensor per layer (in ``config.layers`` order), each ``[S, B, C, h, w]``: the S
    timesteps' maps of that layer for a batch of B images (``h = H / stride``).
    """

    def __init__(self, config: AggregationConfig):
        super().__init__()
        self.config = config
        c = config
        self.bottlenecks = nn.ModuleList(BottleneckBlock(ch, c.bottleneck_dim, c.projection_dim, c.norm_groups)
                                         for ch in c.channels)
        self.mixing_weights = nn.Parameter(torch.ones(len(c.layers), len(c.timesteps)))

    def weights(self) -> torch.Tensor:
        """The normalised mixing weights ``[L, S]`` (softmax over all L * S entries; they sum to 1)."""
        return self.mixing_weights.flatten().softmax(0).view_as(self.mixing_weights)

    def check_maps(self, maps: Sequence[torch.Tensor]) -> None:
        c = self.config
        if len(maps) != len(c.layers):
            raise ValueError(f"the aggregation network takes {len(c.layers)} layers' maps ({', '.join(c.layers)}), "
                             f"got {len(maps)}")
        for layer, ch, m in zip(c.layers, c.channels, maps):
            if m.ndim != 5 or m.shape[0] != len(c.timesteps) or m.shape[2] != ch:
                raise ValueError(f"layer {layer}: maps must be [S={len(c.timesteps)}, B, C={ch}, h, w], got "
                                 f"{tuple(m.shape)}")

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        self.check_maps(maps)
        c = self.config
        weights = self.weights()
        out = None
        for index, (block, stride, m) in enumerate(zip(self.bottlenecks, c.strides, maps)):
            s, b = m.shape[:2]
            x = m.flatten(0, 1)  # the S maps of a layer share its block: one call on S * B images
            if stride != c.output_stride:
                # a whole scale factor is exactly ``size=(h * f, w * f)`` and stays dynamic in ONNX
                x = F.interpolate(x, scale_factor=stride / c.output_stride, mode="bilinear", align_corners=False)
            y = block(x).unflatten(0, (s, b))
            mixed = (weights[index].to(y.dtype)[:, None, None, None, None] * y).sum(0)
            out = mixed if out is None else out + mixed
        return out
