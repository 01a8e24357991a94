"""``Aggregator``: a trained aggregation network with everything needed to use it again, in one file.

``aggregator.safetensors`` holds the network (``network.*``), for the ``cleandift-heads`` source
the CleanDIFT projection heads it was trained with (``heads.*``, release key names), and in its
metadata ``format``, ``config`` (the network's shape, :class:`AggregationConfig`) and ``source``
(which features it aggregates and how they were made). An engine file plus this file are all
that ``Engine(..., aggregator=FILE)`` and the ONNX export need: an ``Aggregator`` is a derived
output (``formats.derived.DerivedOutput``) named ``"hyper"``, and importing this module registers
the ``aggregator=`` option that opens one from its file.

Sources (the feature grid the network mixes, docs/method.md, Diffusion Hyperfeatures):

- ``cleandift``: the student's taps from one pass, one map per layer (S = 1);
- ``cleandift-heads``: the same pass, each tap also projected through its head at S timesteps;
- ``inversion``: the base model's taps at S of the T steps of DDIM inversion (the original);
- ``one-step``: one base-model call at U-Net timestep -1 (the original's one-step variant).

``aggregator(feats)`` takes ``{tap: B x C x h x w}`` for the first two and ``{tap: B x S x C x h x
w}`` for the other two, and returns the descriptors ``B x projection_dim x H/stride x W/stride``.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..build_info import _package_version
from ..checkpoint import (check_state_dict, load_strict, read_safetensors, read_safetensors_metadata,
                          read_safetensors_shapes, write_safetensors)
from ..checks import loads_json
from ..formats.derived import DerivedExport, DerivedOption, register_option
from ..models.heads import ProjectionHeads
from ..taps import TAP_TABLE, resolve_taps
from ..timesteps import check_timestep
from .network import AggregationConfig, AggregationNetwork

HYPER = "hyper"  # the descriptor's name beside the taps (Engine.extract, the ONNX output)
FORMAT = "cleandift_rt_aggregator"
SOURCES = ("cleandift", "cleandift-heads", "inversion", "one-step")
ENGINE_SOURCES = ("cleandift", "cleandift-heads")  # computed from an engine's taps
NETWORK_PREFIX, HEADS_PREFIX = "network.", "heads."


def _fused_heads_run_on(device: torch.device) -> bool:
    """Whether the native projection kernel runs on ``device`` (CPU always; CUDA when built with it)."""
    try:
        from ..build_info import native

        return device.type == "cpu" or (device.type == "cuda" and native().build_info()["cuda_compiled"])
    except ImportError:
        return False


class Aggregator(nn.Module):
    """A trained (or fresh) aggregation network over one feature source; see the module docstring.

    Over the ``cleandift`` / ``cleandift-heads`` sources it is the derived output ``"hyper"`` of an
    Engine or an export (``name``, ``reads``, ``channels``, ``stride``, ``for_export``).
    """

    name = HYPER

    def __init__(self, network: AggregationNetwork, source: str, heads: ProjectionHeads | None = None,
                 info: Mapping | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown feature source {source!r}: use one of {', '.join(SOURCES)}")
        config = network.config
        resolve_taps(config.layers)
        wrong = [f"{t}: {s}" for t, s in zip(config.layers, config.strides) if TAP_TABLE[t].stride != s]
        if wrong:
            raise ValueError(f"layer strides disagree with the tap table ({', '.join(wrong)})")
        if (source == "cleandift-heads") != (heads is not None):
            raise ValueError("the cleandift-heads source needs the projection heads (and only it uses them)")
        if heads is not None:
            missing = [t for t in config.layers if t not in heads.taps]
            if missing:
                raise ValueError(f"the projection heads have no head for layer(s) {missing} (they cover "
                                 f"{', '.join(heads.taps)})")
            for t in config.timesteps:
                check_timestep(t, "head timestep")
            wrong = [f"{t}: {heads.tap_channels[t]} vs {c}" for t, c in zip(config.layers, config.channels)
                     if heads.tap_channels[t] != c]
            if wrong:
                raise ValueError(f"the heads' widths differ from the network's ({', '.join(wrong)})")
        if source == "cleandift" and len(config.timesteps) != 1:
            raise ValueError("the cleandift source has one map per layer: give exactly one timestep label")
        self.network, self.source, self.heads = network, source, heads
        self.info = dict(info or {})
        self.path: Path | None = None  # the file it was read from (from_file)
        self._frozen_modulation: dict[tuple[str, float], list[tuple]] = {}

    # -- description ---------------------------------------------------------------------------

    @property
    def config(self) -> AggregationConfig:
        return self.network.config

    @property
    def layers(self) -> tuple[str, ...]:
        return self.config.layers

    @property
    def timesteps(self) -> tuple[float, ...]:
        return self.config.timesteps

    @property
    def reads(self) -> tuple[str, ...]:
        return self.config.layers

    @property
    def channels(self) -> int:
        return self.config.projection_dim

    @property
    def output_stride(self) -> int:
        return self.config.output_stride

    stride = output_stride

    def mixing_weights(self) -> np.ndarray:
        """``[L, S]`` softmax-normalised mixing weights (rows: layers, columns: timesteps)."""
        with torch.no_grad():
            return self.network.weights().detach().cpu().double().numpy()

    def describe(self) -> dict:
        c = self.config
        return {"format": FORMAT, "source": self.source, "layers": list(c.layers), "channels": list(c.channels),
                "timesteps": list(c.timesteps), "projection_dim": c.projection_dim, "output_stride": c.output_stride,
                "heads": self.heads is not None, "parameters": sum(p.numel() for p in self.network.parameters()),
                **self.info}

    # -- computing descriptors -----------------------------------------------------------------

    def grid(self, feats: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The network's input: per layer ``[S, B, C, h, w]``, from this source's features."""
        missing = [t for t in self.layers if t not in feats]
        if missing:
            raise ValueError(f"the aggregator needs taps {missing} (it aggregates {', '.join(self.layers)})")
        maps = []
        for tap in self.layers:
            x = torch.as_tensor(feats[tap])
            if not x.dtype.is_floating_point:
                raise TypeError(f"tap {tap}: features must be floating point, got {x.dtype}")
            x = x.float()
            want = 4 if self.source in ENGINE_SOURCES else 5
            if x.ndim != want:
                shape = "B x C x h x w" if want == 4 else "B x S x C x h x w"
                raise ValueError(f"tap {tap}: the {self.source} source's features are {shape}, got {tuple(x.shape)}")
            if self.source == "cleandift":
                maps.append(x[None])
            elif self.source == "cleandift-heads":
                maps.append(torch.stack([self._head(tap, x, t) for t in self.timesteps]))
            else:
                maps.append(x.transpose(0, 1))
        return maps

    def _head(self, tap: str, x: torch.Tensor, t: float) -> torch.Tensor:
        """Features of ``tap`` as the teacher sees them at ``t``: the fused kernel, or PyTorch when tracing."""
        if not torch.jit.is_tracing() and _fused_heads_run_on(x.device):
            from ..kernels.fused_heads import project

            return project(x.contiguous(), t, self.heads, tap)
        # heads(tap, x, t) spelled out with the layers' modulation (AdaRMS or FiLM scale and shift), which
        # does not depend on the image: frozen before an export traces this, it enters the graph as constants
        modulations = self._frozen_modulation.get((tap, t)) or self.head_modulation(tap, t)
        tokens = x.flatten(2).transpose(1, 2)
        for layer, (scale, shift) in zip(self.heads.adapters[tap].layers, modulations):
            tokens = layer.residual(tokens, scale, shift)
        return tokens.transpose(1, 2).reshape(x.shape)

    def head_modulation(self, tap: str, t: float) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer of ``tap``'s head at ``t``: its modulation ``(1 + scale [1, D], shift [1, D] or None)``."""
        cond = self.heads.cond(t, batch=1)
        return [layer.modulation(cond) for layer in self.heads.adapters[tap].layers]

    def freeze_head_modulation(self) -> None:
        """Compute every head layer's modulation once, now (call before tracing: the graph gets them as constants)."""
        if self.heads is None:
            return
        with torch.no_grad():
            self._frozen_modulation = {(tap, t): [tuple(None if m is None else m.detach().clone() for m in pair)
                                              for pair in self.head_modulation(tap, t)]
                                   for tap in self.layers for t in self.timesteps}

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        maps = self.grid(feats)
        device = next(self.network.parameters()).device
        return self.network([m.to(device) for m in maps])

    def for_export(self, tap_channels: Mapping[str, int]) -> DerivedExport:
        """The ONNX export's hook: checked against the model's tap widths, on the CPU, head modulation frozen."""
        _check_engine_source(self)
        wrong = [f"{t}: {c} vs {tap_channels[t]}" for t, c in zip(self.layers, self.config.channels)
                 if tap_channels[t] != c]
        if wrong:
            raise ValueError(f"the aggregator was trained on another model's taps (channels {', '.join(wrong)}): "
                             "export it with the student it was trained on")
        self.to("cpu").eval()
        self.freeze_head_modulation()  # image-independent: constants in the graph
        return DerivedExport(self, hyper_output(self, self.path.name if self.path is not None else ""))

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, **metadata) -> Path:
        """Write the self-contained ``aggregator.safetensors`` (atomic)."""
        tensors = {NETWORK_PREFIX + k: v for k, v in self.network.state_dict().items()}
        if self.heads is not None:
            tensors.update({HEADS_PREFIX + k: v for k, v in self.heads.release_state_dict().items()})
        meta = {"format": FORMAT, "config": json.dumps(self.config.to_dict()),
                "source": json.dumps({"name": self.source, **self.info}), "package_version": _package_version()}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
        write_safetensors(path, tensors, meta)
        return Path(path)

    @classmethod
    def from_file(cls, path: str | Path) -> Aggregator:
        """Load an ``aggregator.safetensors`` written by ``train-aggregator`` (or :meth:`save`)."""
        path = Path(path)
        meta = read_safetensors_metadata(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an aggregator file (format {meta.get('format')!r}): train one with "
                             "`cleandift-rt train-aggregator`")
        if "config" not in meta or "source" not in meta:
            raise ValueError(f"{path}: aggregator metadata is incomplete (no config or source): re-train or re-save it")
        config_dict = loads_json(meta["config"], f"{path}: aggregator metadata 'config'")  # depth bounded
        source = loads_json(meta["source"], f"{path}: aggregator metadata 'source'")
        if not isinstance(source, dict) or "name" not in source:
            raise ValueError(f"{path}: aggregator metadata 'source' must name the feature source")
        config = AggregationConfig.from_dict(config_dict, str(path))
        # the network the config describes, built without memory and compared with the file's tensors
        # first: a few hundred bytes of metadata may describe gigabytes of weights the file does not hold
        with torch.device("meta"):
            skeleton = AggregationNetwork(config)
        shapes = {k[len(NETWORK_PREFIX):]: torch.empty(s, device="meta")
                  for k, s in read_safetensors_shapes(path).items() if k.startswith(NETWORK_PREFIX)}
        check_state_dict(skeleton.state_dict(), shapes, f"aggregation network in {path}")
        state = read_safetensors(path)
        network = AggregationNetwork(config)
        load_strict(network, {k[len(NETWORK_PREFIX):]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)},
                    f"aggregation network in {path}")
        head_state = {k[len(HEADS_PREFIX):]: v for k, v in state.items() if k.startswith(HEADS_PREFIX)}
        heads = ProjectionHeads.from_state_dict(head_state, f"heads in {path}").eval() if head_state else None
        info = {k: v for k, v in source.items() if k != "name"}
        for key in ("steps", "val_pck"):
            if key in meta:
                info.setdefault(key, loads_json(meta[key], f"{path}: metadata {key!r}"))
        aggregator = cls(network.eval(), source["name"], heads, info)
        aggregator.path = path
        return aggregator


def is_aggregator_file(path: str | Path) -> bool:
    """True for a readable safetensors file whose metadata says it is an aggregator."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_safetensors_metadata(path).get("format") == FORMAT
    except ValueError:
        return False


def hyper_output(aggregator: Aggregator, file_name: str = "") -> dict:
    """What an export records about its ``hyper`` output (``ArtifactInfo.extra["hyper"]``)."""
    return {"channels": aggregator.channels, "stride": aggregator.output_stride, "source": aggregator.source,
            "layers": list(aggregator.layers), "timesteps": list(aggregator.timesteps), "aggregator": file_name}


def open_for_engine(aggregator) -> Aggregator:
    """The aggregator of ``Engine(aggregator=)`` and ``export_onnx(aggregator=)``: a file (or an Aggregator)
    over an engine's taps."""
    agg = aggregator if isinstance(aggregator, Aggregator) else Aggregator.from_file(aggregator)
    _check_engine_source(agg)
    return agg.eval()


def _check_engine_source(agg: Aggregator) -> None:
    if agg.source not in ENGINE_SOURCES:
        raise ValueError(f"{agg.path or 'the aggregator'} aggregates the base model's {agg.source} features (DDIM "
                         "inversion), which no engine or exported graph computes: use an aggregator of the cleandift "
                         "or cleandift-heads source, or cleandift_rt.hyper.HyperFeatures.from_inversion with the base "
                         "model (eval-spair --aggregator with --base)")


register_option(DerivedOption(
    "aggregator", HYPER, open_for_engine,
    "the Diffusion Hyperfeatures descriptor: open the engine with aggregator=FILE (cleandift-rt train-aggregator), "
    "or export it with --aggregator"))
