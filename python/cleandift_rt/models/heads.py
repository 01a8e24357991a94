"""Projection heads and time mapping of the CleanDIFT release (docs/method.md, projection heads).

``cond(t) = out_norm(blocks(in_norm(time_in_proj(fourier(t / 999)))))`` and, per tap, three
modulated SwiGLU residual layers conditioned on it. The modulation is the release's AdaRMS
(RMS-normalise, scale by ``1 + linear(cond)``; the default) or the paper's FiLM (no normalisation,
``x * (1 + scale(cond)) + shift(cond)``, scale and shift from one ``Linear(256 -> 2D)``).
``down_proj`` and the modulation's linear are zero-initialised, so every head is exactly the
identity until trained. Parameter names match the release's aligner state dict (``time_emb.weight``,
``mapping.*``, ``adapters.{tap}.layers.{j}.*``); a FiLM layer keeps its linear under ``film.linear``
instead of AdaRMS's ``norm.linear``, so the keys alone say which a file holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import DEFAULT_HEAD_CONDITIONING, check_head_conditioning
from ..taps import TAPS, resolve_taps
from ..timesteps import check_timestep

COND_DIM = 256
MAPPING_FF = 768
MAPPING_BLOCKS = 2
HEAD_LAYERS = 3
EPS = 1e-6
T_SCALE = 999.0
HEAD_PREFIXES = ("time_emb.", "time_in_proj.", "mapping.", "adapters.")


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """RMS norm over the last axis, statistics in fp32 whatever the input precision."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = x.to(dtype).pow(2).mean(dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(mean_sq + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale)


# The two modulations a head layer can apply to its input. Each splits into ``modulation(cond)``,
# which depends on the timestep only (``(1 + scale, shift or None)``, each [B, D] in cond's dtype:
# callers that see one timestep many times, the fused kernel and an export, compute it once), and
# ``modulate(x, scale, shift)`` on the tokens [B, N, D].


class AdaRMSNorm(nn.Module):
    """RMS norm whose per-channel scale is ``1 + linear(cond)`` (zero-init: plain RMS norm)."""

    def __init__(self, features: int, cond_features: int = COND_DIM):
        super().__init__()
        self.linear = nn.Linear(cond_features, features, bias=False)
        nn.init.zeros_(self.linear.weight)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(cond, self.linear.weight.to(cond.dtype)) + 1, None

    @staticmethod
    def modulate(x: torch.Tensor, scale: torch.Tensor, shift: None = None) -> torch.Tensor:
        return rms_norm(x, scale[:, None, :])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, *self.modulation(cond))


class FiLM(nn.Module):
    """``x * (1 + scale(cond)) + shift(cond)`` with no normalisation (Perez et al. 2018).

    One linear gives both: output rows ``[:D]`` the scale, ``[D:]`` the shift. Zero-init: identity.
    """

    def __init__(self, features: int, cond_features: int = COND_DIM):
        super().__init__()
        self.linear = nn.Linear(cond_features, 2 * features, bias=False)
        nn.init.zeros_(self.linear.weight)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = F.linear(cond, self.linear.weight.to(cond.dtype)).chunk(2, dim=-1)
        return scale + 1, shift

    @staticmethod
    def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return x * scale[:, None, :].to(x.dtype) + shift[:, None, :].to(x.dtype)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.modulate(x, *self.modulation(cond))


# head conditioning -> (the modulation's attribute in a head layer, its module); the attribute names
# the state-dict keys (``...layers.{j}.norm.linear.weight`` / ``...film.linear.weight``)
MODULATORS = {"adarms": ("norm", AdaRMSNorm), "film": ("film", FiLM)}


def swiglu(y: torch.Tensor) -> torch.Tensor:
    value, gate = y.chunk(2, dim=-1)
    return value * F.silu(gate)


class FourierFeatures(nn.Module):
    def __init__(self, out_features: int = COND_DIM):
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 whatever the module dtype: t / 999 needs the precision, and the buffer may be half.
        f = 2 * math.pi * x.float() @ self.weight.float().T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class MappingBlock(nn.Module):
    def __init__(self, d_model: int = COND_DIM, d_ff: int = MAPPING_FF):
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.up_proj = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(swiglu(self.up_proj(self.norm(x))))


class MappingNetwork(nn.Module):
    def __init__(self, d_model: int = COND_DIM, d_ff: int = MAPPING_FF, n_blocks: int = MAPPING_BLOCKS):
        super().__init__()
        self.in_norm = RMSNorm(d_model)
        self.blocks = nn.ModuleList(MappingBlock(d_model, d_ff) for _ in range(n_blocks))
        self.out_norm = RMSNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class HeadLayer(nn.Module):
    """``x + down(swiglu(up(modulate(x, cond))))`` with the AdaRMS or FiLM modulation."""

    def __init__(self, dim: int, cond_features: int = COND_DIM, conditioning: str = DEFAULT_HEAD_CONDITIONING):
        super().__init__()
        self.conditioning = check_head_conditioning(conditioning)
        attribute, modulator = MODULATORS[conditioning]
        self.add_module(attribute, modulator(dim, cond_features))
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)  # rows [:dim] value, [dim:] gate
        self.down_proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.down_proj.weight)

    @property
    def modulator(self) -> AdaRMSNorm | FiLM:
        return getattr(self, MODULATORS[self.conditioning][0])

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(1 + scale, shift or None)`` of ``cond [B, 256]`` (see the modulators above)."""
        return self.modulator.modulation(cond)

    def residual(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        return x + self.down_proj(swiglu(self.up_proj(self.modulator.modulate(x, scale, shift))))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.residual(x, *self.modulation(cond))


class ProjectionHead(nn.Module):
    """One tap's head: ``HEAD_LAYERS`` modulated SwiGLU residual layers on (B, H*W, D) tokens."""

    def __init__(self, dim: int, cond_features: int = COND_DIM, n_layers: int = HEAD_LAYERS,
                 conditioning: str = DEFAULT_HEAD_CONDITIONING):
        super().__init__()
        self.layers = nn.ModuleList(HeadLayer(dim, cond_features, conditioning) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond)
        return x


class ProjectionHeads(nn.Module):
    """The release's aligner minus the U-Nets: time mapping plus one head per tap.

    ``heads(tap, features, t)`` maps student features ``B x C x h x w`` to the teacher's features
    at timestep ``t`` (an int, or a tensor of B timesteps). ``conditioning``: ``"adarms"`` (the
    release) or ``"film"`` (the paper's main configuration), see the module docstring.
    """

    def __init__(self, tap_channels: Mapping[str, int], conditioning: str = DEFAULT_HEAD_CONDITIONING):
        super().__init__()
        taps = resolve_taps(list(tap_channels))
        self.conditioning = check_head_conditioning(conditioning)
        self.tap_channels = {t: int(tap_channels[t]) for t in taps}
        self.time_emb = FourierFeatures(COND_DIM)
        self.time_in_proj = nn.Linear(COND_DIM, COND_DIM, bias=False)
        self.mapping = MappingNetwork()
        self.adapters = nn.ModuleDict({t: ProjectionHead(c, conditioning=conditioning)
                                       for t, c in self.tap_channels.items()})

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self.adapters.keys())

    def cond(self, t: int | float | torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Conditioning vector(s) ``[B, 256]`` for timestep(s) ``t``: finite, in [0, 999] (fractions kept)."""
        check_timestep(t)
        device, dtype = self.time_in_proj.weight.device, self.time_in_proj.weight.dtype
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(batch or 1)
        if t.ndim != 1:
            raise ValueError(f"t must be a scalar or a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
        fourier = self.time_emb((t / T_SCALE)[:, None]).to(dtype)
        return self.mapping(self.time_in_proj(fourier))

    def check_features(self, tap: str, features: torch.Tensor) -> tuple[int, int, int, int]:
        """Shape ``(B, C, h, w)`` of features this head can take, or a ValueError saying why not."""
        if tap not in self.adapters:
            raise ValueError(f"no projection head for tap {tap!r}: these heads cover {', '.join(self.taps)}")
        if features.ndim != 4:
            raise ValueError(f"features must be B x C x h x w, got shape {tuple(features.shape)}")
        b, c, h, w = features.shape
        if c != self.tap_channels[tap]:
            raise ValueError(f"tap {tap!r} has {self.tap_channels[tap]} channels, features have {c}")
        return b, c, h, w

    def forward(self, tap: str, features: torch.Tensor, t: int | float | torch.Tensor) -> torch.Tensor:
        """The head of ``tap`` at timestep(s) ``t``, computed in the heads' own dtype (features of
        another float dtype are converted there and the result back to theirs)."""
        b, c, h, w = self.check_features(tap, features)
        if not features.dtype.is_floating_point:
            raise TypeError(f"features must be floating point, got {features.dtype}")
        cond = self.cond(t, batch=b)
        if cond.shape[0] != b:
            raise ValueError(f"got {cond.shape[0]} timesteps for a batch of {b}")
        dtype = self.time_in_proj.weight.dtype
        tokens = features.flatten(2).transpose(1, 2).to(dtype)
        out = self.adapters[tap](tokens, cond.to(dtype))
        return out.transpose(1, 2).reshape(b, c, h, w).to(features.dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "state dict") -> "ProjectionHeads":
        """Build heads from a release-style state dict; keys outside the head prefixes are ignored.

        AdaRMS or FiLM is read from the keys (``...layers.{j}.norm.linear.weight`` or
        ``...layers.{j}.film.linear.weight``): files carry no other record of it."""
        head_state = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
        channels: dict[str, int] = {}
        for key, value in head_state.items():
            parts = key.split(".")
            if parts[0] == "adapters" and parts[-2:] == ["down_proj", "weight"] and parts[3] == "0":
                channels[parts[1]] = int(value.shape[0])
        if not channels:
            raise ValueError(f"{source} holds no projection heads (no 'adapters.<tap>.layers.*' keys): "
                             "is it a '_unet' file? Heads live in the '_full' release file")
        unknown = sorted(set(channels) - set(TAPS))
        if unknown:
            raise ValueError(f"{source} has heads for unknown taps {unknown}; valid taps are {', '.join(TAPS)}")
        heads = cls(channels, conditioning=head_conditioning_of(head_state, source))
        from ..checkpoint import load_strict

        load_strict(heads, head_state, source)
        return heads

    @classmethod
    def from_release(cls, path: str | Path) -> "ProjectionHeads":
        """Read heads, mapping and Fourier buffer from a ``_full`` release safetensors file."""
        from ..checkpoint import read_safetensors

        return cls.from_state_dict(read_safetensors(path), source=str(path))

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}


def head_conditioning_of(keys: Iterable[str], source: str = "state dict") -> str:
    """``"adarms"`` or ``"film"``: which modulation the head layers of a state dict's keys use."""
    found = {kind for kind, (attribute, _) in MODULATORS.items() for key in keys
             if key.startswith("adapters.") and key.endswith(f".{attribute}.linear.weight")}
    if len(found) > 1:
        raise ValueError(f"{source} mixes AdaRMS ('norm.linear') and FiLM ('film.linear') head layers: a head file "
                         "holds one kind; the file is corrupt or assembled from two runs")
    return found.pop() if found else DEFAULT_HEAD_CONDITIONING


def build_heads(block_out_channels: Iterable[int], taps=None,
                conditioning: str = DEFAULT_HEAD_CONDITIONING) -> ProjectionHeads:
    from ..taps import tap_channels

    channels = tap_channels(list(block_out_channels))
    return ProjectionHeads({t: channels[t] for t in resolve_taps(taps)}, conditioning=conditioning)
