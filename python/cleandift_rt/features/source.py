"""The one feature-source protocol: what evaluation, fusion, GATE, hyperfeatures and the probes
compute per image and keep in a :class:`~cleandift_rt.features.store.FeatureStore`.

A source is a thin adapter over a model: an Engine (``evaluation.EngineFeatures``,
``probes.EngineSource``, ``hyper.EngineTaps``), the noisy DIFT baseline (``evaluation.DiftFeatures``,
``probes.DiftSource``), the projection heads (``probes.ProjectedSource``), DDIM inversion
(``hyper.InversionTaps``), GATE (``gate.source.GateFeatures``, ``RecipeFeatures``) or a trained
aggregator (``hyper.HyperFeatures``). Each has a ``name`` (what reports call it), a ``key`` (names
the model files and every setting that changes its output: the store folder and the journals),
``compute(image, category="") -> {name: float32 array}`` (one image's maps, ``C x h x w``, or
``S x C x h x w`` for S timesteps) and ``describe()`` (what the reports record).

A source with one map, a descriptor, derives from :class:`DescriptorSource`: its ``features(image,
category)`` gives that map as a ``[C, h, w]`` float32 tensor, what ``evaluation.evaluate`` matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class FeatureSource(Protocol):
    """Per-image features of one model and its settings (module docstring)."""

    name: str
    key: str

    def compute(self, image, category: str = "") -> Mapping[str, np.ndarray]:
        """One image's maps, ``{name: float32 array}``, CPU."""

    def describe(self) -> dict:
        """The settings the reports record."""


def tap_map(value, tap: str) -> np.ndarray:
    """The ``C x h x w`` float32 CPU map of a ``1 x C x h x w`` tap output (tensor or array)."""
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if t.ndim != 4 or t.shape[0] != 1:
        raise ValueError(f"tap {tap}: expected a 1 x C x h x w feature map, got shape {tuple(t.shape)}")
    return t[0].detach().to("cpu", torch.float32).numpy()


def one_map(maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """The single map of a descriptor's ``compute`` output."""
    if len(maps) != 1:
        raise ValueError(f"a descriptor gives one map, this source gives {len(maps)}: {', '.join(maps)}")
    return next(iter(maps.values()))


class DescriptorSource:
    """Base of the sources with one map: ``features`` is that map as a float32 tensor."""

    def features(self, image, category: str = "") -> torch.Tensor:
        return torch.from_numpy(np.asarray(one_map(self.compute(image, category)), dtype=np.float32))
