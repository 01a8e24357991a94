"""Feature sources of the probes and their view of the one feature store.

The sources are ``features.source.FeatureSource`` adapters with one map (``DescriptorSource``):
``name``, ``key`` (names the model and every setting that changes its features; it names the
cache folder), ``tap``, ``t`` (None, or the timestep of a sweep row), ``compute(image) -> {tap:
[C, h, w] float32}`` and optionally ``check()`` (opens the model and raises for problems of the whole
run, such as a missing tap); a source whose ``compute`` returns the bare ``[C, h, w]`` array works too.
:class:`EngineSource` wraps a ``cleandift_rt.Engine``, :class:`DiftSource` the noisy baseline
(``DiftExtractor`` at one t), :class:`ProjectedSource` CleanDIFT's features through the projection
heads at one t (computed from its parent's map, which is read from the cache when it is there).

:class:`ProbeStore` (also importable as ``FeatureStore``, its earlier name) keeps one ``.npy`` per
image, per source (engine and settings), per view (``map``: the tap's ``C x h x w`` grid; ``gap``: its
global average, ``C``) under ``ROOT/<source key>/<view>/<image key>.npy`` in a
``features.store.FeatureStore``: written atomically, read back memory-mapped, a file cut short by a
crash computed again. A rerun finds every file and calls no model (and never opens one: sources take
a :class:`Lazy`). Targets (depth and label maps) are cached the same way, as decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..features import store as feature_store
from ..features.source import DescriptorSource, one_map, tap_map
from ..taps import resolve_taps
from .data import Sample, SampleError

VIEWS = ("map", "gap")


class Lazy:
    """An object built on first use (an Engine or a base model costs seconds to open; a fully
    cached rerun never needs it)."""

    def __init__(self, factory: Callable[[], object]):
        self._factory, self._value, self.built = factory, None, False

    def get(self):
        if not self.built:
            self._value, self.built = self._factory(), True
        return self._value


def _resolve(obj):
    return obj.get() if isinstance(obj, Lazy) else obj


class EngineSource(DescriptorSource):
    """CleanDIFT features: one Engine pass per image at the engine's size, with its baked prompt."""

    def __init__(self, engine, tap: str, key: str, name: str = "cleandift"):
        resolve_taps(tap)
        self.engine, self.tap, self.key, self.name, self.t = engine, tap, key, name, None

    def check(self) -> None:
        """Open the engine (when lazy) and check it has the tap: a problem of the run, not of one image."""
        taps = getattr(_resolve(self.engine), "taps", None)
        if taps is not None and self.tap not in taps:
            raise ValueError(f"the engine has no tap {self.tap!r} (it has {', '.join(taps)}): pass --tap with one "
                             f"of those, or export the model with --taps {self.tap}")

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        return {self.tap: tap_map(_resolve(self.engine).extract([image], taps=[self.tap])[self.tap], self.tap)}

    def describe(self) -> dict:
        return {"method": self.name, "tap": self.tap}


class DiftSource(DescriptorSource):
    """The noisy baseline (docs/method.md, noisy baseline): ``extractor`` is a ``DiftExtractor`` (or a Lazy one) at ``t``."""

    def __init__(self, extractor, tap: str, key: str, t: int, name: str = "dift"):
        resolve_taps(tap)
        self.extractor, self.tap, self.key, self.t, self.name = extractor, tap, key, int(t), name

    def check(self) -> None:
        _resolve(self.extractor)

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        return {self.tap: tap_map(_resolve(self.extractor).extract([image], taps=[self.tap])[self.tap], self.tap)}

    def describe(self) -> dict:
        return {"method": self.name, "tap": self.tap, "t": self.t}


class ProjectedSource(DescriptorSource):
    """CleanDIFT features through the projection head of the tap at ``t`` (``cleandift_rt.project``):
    the features as the teacher would see them at that timestep, computed from ``parent``'s map."""

    def __init__(self, parent: EngineSource, heads, key: str, t: int, name: str = "cleandift-projected"):
        self.parent, self.heads, self.key, self.t, self.name, self.tap = parent, heads, key, int(t), name, parent.tap

    def project(self, parent_map: np.ndarray) -> np.ndarray:
        from ..kernels.fused_heads import project

        feats = torch.from_numpy(np.ascontiguousarray(parent_map, dtype=np.float32))[None]
        return project(feats, self.t, _resolve(self.heads), self.tap)[0].numpy()

    def compute(self, image, category: str = "") -> dict[str, np.ndarray]:
        return {self.tap: self.project(one_map(self.parent.compute(image)))}

    def describe(self) -> dict:
        return {"method": self.name, "tap": self.tap, "t": self.t}


class ProbeStore:
    """Per-image features and targets on disk, read back memory-mapped (module docstring).

    ``dtype="float16"`` (default) halves the disk and page-cache footprint (an SD 2.1 us6 map is
    5.9 MB instead of 11.8 MB); under the store's fp16 policy a map with values beyond float16's
    range is stored as float32. Everything downstream reads the stored values, so a first run and a
    rerun see the same numbers. ``computed`` / ``reused`` count images per source name.
    """

    def __init__(self, root: str | Path, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"cache dtype must be float16 or float32, got {dtype!r}")
        self.root, self.dtype = Path(root), dtype
        self.store = feature_store.FeatureStore(root, dtype)
        self.targets = feature_store.FeatureStore(root, None)  # ground truth as decoded: label maps stay integers
        self._memo: dict[str, tuple[str, np.ndarray]] = {}  # source key -> (image key, its last raw map)

    @property
    def computed(self):
        return self.store.computed

    @property
    def reused(self):
        return self.store.reused

    @staticmethod
    def _folder(source, view: str) -> str:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        return f"{source.key}/{view}"

    def path(self, source, view: str, sample: Sample) -> Path:
        return self.store.array_path(self._folder(source, view), sample.image_key)

    def has(self, source, view: str, sample: Sample) -> bool:
        return self.store.has_array(self._folder(source, view), sample.image_key)

    def features(self, source, view: str, sample: Sample, image: Callable[[], object] | None = None) -> np.ndarray:
        """The cached features of ``sample`` (computed and stored first when missing). ``image``
        returns the decoded image (default ``sample.read_image``); pass a memoised one when several
        sources read the same image."""
        def compute():
            feats = self._raw_map(source, sample, image or sample.read_image)
            if view == "gap":
                feats = feats.reshape(feats.shape[0], -1).mean(axis=1)
            if not np.isfinite(feats).all():
                raise SampleError("features contain NaN or Inf", f"{source.name} on {sample.name}")
            return feats

        return self.store.get_array(self._folder(source, view), sample.image_key, compute, label=source.name)

    def _raw_map(self, source, sample: Sample, image) -> np.ndarray:
        if isinstance(source, ProjectedSource):
            # the parent's stored map when there is one: the values every run (and every probe) sees
            stored = self.store.load_array(self._folder(source.parent, "map"), sample.image_key)
            parent = np.array(stored, dtype=np.float32) if stored is not None else \
                self._raw_map(source.parent, sample, image)
            return source.project(parent)
        memo = self._memo.get(source.key)
        if memo is not None and memo[0] == sample.image_key:  # projected views of a map just computed
            return memo[1]
        check = getattr(source, "check", None)  # model-level problems fail the run, not one image
        if check is not None:
            check()
        try:
            out = source.compute(image())
        except (ValueError, TypeError) as exc:
            raise SampleError("feature extraction failed", f"{sample.name}: {str(exc).splitlines()[0]}") from None
        feats = np.asarray(one_map(out) if isinstance(out, Mapping) else out, dtype=np.float32)
        self._memo[source.key] = (sample.image_key, feats)
        return feats

    def target(self, sample: Sample, kind: str) -> np.ndarray:
        """The sample's target (depth or label map), decoded once and cached memory-mapped."""
        return self.targets.get_array(f"targets/{kind}", sample.target_key, sample.read_target)


FeatureStore = ProbeStore  # the earlier name: ``probes.FeatureStore(root, dtype)`` keeps working
