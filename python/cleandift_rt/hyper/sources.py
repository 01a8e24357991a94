"""Feature sources of the aggregator: what is computed (and cached) per image, and descriptors from it.

A *stored source* gives the per-image arrays the cache keeps and the aggregator reads:

- :class:`EngineTaps` (``cleandift``, ``cleandift-heads``): the student's taps from one pass of an
  Engine, ``{tap: C x h x w}``; the heads of ``cleandift-heads`` run on the fly in the aggregator,
  so both sources share one cache (about 15.6 MB per image at 512 px for SD 1.5 / 2.1 in fp16);
- :class:`InversionTaps` (``inversion``, ``one-step``): the base model's taps at the kept steps of
  DDIM inversion, ``{tap: S x C x h x w}`` (S times that: about 171 MB per image for S = 11).

Each is a ``features.source.FeatureSource`` (``name``, ``key``: the model and every setting that
changes the arrays, the store folder; ``compute(image) -> {tap: float32 array}``; ``describe()``)
with ``layers``, ``channels`` (per layer), ``strides`` and ``timesteps`` (labels of its S maps).

:class:`HyperFeatures` turns an aggregator into a descriptor source of ``evaluation.runner.evaluate``
(``features(image, category) -> C x h x w``): from an Engine opened with ``aggregator=`` (engine
sources) or from the base model's inversion (the others).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..features.source import DescriptorSource, tap_map
from ..models.heads import ProjectionHeads
from ..taps import TAP_TABLE, resolve_taps, tap_channels
from .aggregator import ENGINE_SOURCES, HYPER, SOURCES, Aggregator
from ..checkpoint import short_hash
from .inversion import InversionExtractor, InversionSettings
from .network import OUTPUT_STRIDE, PROJECTION_DIM, AggregationConfig, AggregationNetwork

DEFAULT_HEAD_TIMESTEPS = 11


def head_timesteps(count: int = DEFAULT_HEAD_TIMESTEPS) -> tuple[float, ...]:
    """``count`` evenly spaced head timesteps over the schedule the heads were trained on, [0, 999]."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of head timesteps must be an integer >= 1, got {count!r}")
    if count == 1:
        return (261.0,)  # the student's own timestep (docs/method.md, student conditioning)
    return tuple(float(round(999 * i / (count - 1))) for i in range(count))


class EngineTaps:
    """The student's taps from one Engine pass per image, at the engine's size and baked prompt."""

    name = "engine-taps"

    def __init__(self, engine, engine_key: str, layers: Sequence[str] | None = None):
        self.engine = engine
        self.layers = resolve_taps(layers)
        info = engine.info
        have = {t["name"]: int(t["channels"]) for t in info["taps"]}
        missing = [t for t in self.layers if t not in have]
        if missing:
            raise ValueError(f"the engine has no tap(s) {missing} (it has {', '.join(have)}): re-export it with "
                             "--taps including them, or aggregate fewer layers (--layers)")
        self.channels = tuple(have[t] for t in self.layers)
        self.strides = tuple(TAP_TABLE[t].stride for t in self.layers)
        self.size = tuple(engine.size)
        self.timesteps = (float(info.get("timestep", 261.0)),)
        self.key = short_hash("engine-taps", engine_key, self.layers, self.size)

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        out = self.engine.extract([image], taps=list(self.layers))
        return {t: tap_map(out[t], t) for t in self.layers}

    def describe(self) -> dict:
        return {"layers": list(self.layers), "size": list(self.size), "engine": str(getattr(self.engine, "path", ""))}


class InversionTaps:
    """The base model's taps at the kept steps of its DDIM inversion (``inversion``, ``one-step``)."""

    name = "inversion-taps"

    def __init__(self, extractor: InversionExtractor, base_key: str):
        self.extractor = extractor
        self.layers = extractor.taps
        channels = tap_channels(extractor.base.block_out_channels)
        self.channels = tuple(channels[t] for t in self.layers)
        self.strides = tuple(TAP_TABLE[t].stride for t in self.layers)
        s = extractor.settings
        self.size = (s.size, s.size)
        self.timesteps = extractor.timesteps
        self.key = short_hash("inversion-taps", base_key, self.layers, s.steps, s.saved, s.size, s.prompt, s.seed)

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        return self.extractor.extract(image)

    def describe(self) -> dict:
        s = self.extractor.settings
        return {"layers": list(self.layers), "size": list(self.size), "inversion_steps": s.steps, "saved_steps": s.saved,
                "prompt": s.prompt, "seed": s.seed, "base": str(self.extractor.base.source)}


def new_aggregator(source: str, stored, heads: ProjectionHeads | None = None, timesteps: Sequence[float] | None = None,
                   projection_dim: int = PROJECTION_DIM, output_stride: int = OUTPUT_STRIDE,
                   info: dict | None = None) -> Aggregator:
    """An untrained aggregator over ``stored``'s layers (the global RNG draws its initial weights)."""
    if source not in SOURCES:
        raise ValueError(f"unknown feature source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "cleandift-heads":
        if heads is None:
            raise ValueError("the cleandift-heads source needs the release heads: pass --heads FULL_FILE")
        timesteps = tuple(float(t) for t in (timesteps or head_timesteps()))
    else:
        if timesteps is not None:
            raise ValueError(f"head timesteps apply to the cleandift-heads source only, not {source}")
        timesteps = stored.timesteps
    config = AggregationConfig(layers=stored.layers, channels=stored.channels, strides=stored.strides,
                               timesteps=timesteps, projection_dim=projection_dim, output_stride=output_stride)
    details = {**stored.describe(), **(info or {})}
    return Aggregator(AggregationNetwork(config), source, heads if source == "cleandift-heads" else None, details)


class HyperFeatures(DescriptorSource):
    """An aggregator's descriptors as an ``evaluation.runner`` feature source (``features(image, category)``)."""

    def __init__(self, key: str, descriptors: Callable[[object], np.ndarray], details: dict, name: str = HYPER):
        self.key, self.name, self._descriptors, self._details = key, name, descriptors, details

    @classmethod
    def from_engine(cls, engine, key: str, name: str = HYPER) -> HyperFeatures:
        """From an Engine opened with ``aggregator=FILE`` (sources cleandift and cleandift-heads)."""
        if HYPER not in engine.taps:
            raise ValueError("the engine has no 'hyper' output: open it with Engine(..., aggregator=FILE) or export "
                             "the model with --aggregator")

        def descriptors(image):
            return tap_map(engine.extract([image], taps=[HYPER])[HYPER], HYPER)

        details = {"method": name, "engine": str(engine.path), **engine.info.get("aggregator", {})}
        return cls(short_hash(name, key), descriptors, details, name)

    @classmethod
    def from_inversion(cls, aggregator: Aggregator, base, key: str, settings: InversionSettings | None = None,
                       name: str = HYPER) -> HyperFeatures:
        """From the base model's inversion (sources inversion and one-step), as the aggregator was trained."""
        if aggregator.source in ENGINE_SOURCES:
            raise ValueError(f"this aggregator aggregates {aggregator.source} features: open the engine with "
                             "Engine(..., aggregator=FILE) and use HyperFeatures.from_engine")
        info = aggregator.info
        settings = settings or InversionSettings(steps=int(info["inversion_steps"]), saved=int(info["saved_steps"]),
                                                 size=int(info["size"][0]),
                                                 prompt=str(info.get("prompt", "")), seed=int(info.get("seed", 0)))
        extractor = InversionExtractor(base, settings, aggregator.layers)
        if tuple(extractor.timesteps) != tuple(aggregator.timesteps):
            raise ValueError(f"inversion settings give timesteps {list(extractor.timesteps)}, the aggregator was "
                             f"trained on {list(aggregator.timesteps)}")
        aggregator.to(extractor.device)

        @torch.no_grad()
        def descriptors(image):
            arrays = extractor.extract(image)
            return aggregator({t: torch.from_numpy(a)[None] for t, a in arrays.items()})[0].float().cpu().numpy()

        details = {"method": name, **aggregator.describe()}
        return cls(short_hash(name, key, settings), descriptors, details, name)

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        return {self.name: self._descriptors(image)}

    def describe(self) -> dict:
        return dict(self._details)
