"""The feature cache of aggregator training: per image, computed once, fp16, read back memory-mapped.

``ROOT/<source key>/layout.json`` names each stored array and its shape (the same for every image
of a source: one model, one input size); ``ROOT/<source key>/<image key>.npy`` holds one image's
arrays concatenated flat, float16 (float32 for an image with values beyond float16's range).
Files are written atomically; a file cut short by a kill is computed again. The image key covers
the file's path, size and modification time, so a replaced image is computed again too.

``root=None`` (``--cache none``) computes every time and keeps nothing; the values still go
through the same fp16 rounding, so a run gives the same numbers with and without the cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Mapping

import numpy as np

from ..checkpoint import atomic_write_bytes, file_identity

FP16_MAX = 65504.0
LAYOUT_FILE = "layout.json"


def stored_dtype(arrays: Mapping[str, np.ndarray]) -> np.dtype:
    """float16 unless a value lies beyond its range (then float32 for that image)."""
    peak = max(float(np.abs(a).max(initial=0.0)) for a in arrays.values())
    return np.dtype(np.float16 if peak < FP16_MAX else np.float32)


def round_trip(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The values the cache would give back (its rounding), without storing anything."""
    dtype = stored_dtype(arrays)
    return {k: np.ascontiguousarray(v, dtype=np.float32).astype(dtype) for k, v in arrays.items()}


class FeatureCache:
    """``get(image_path, compute) -> {name: array}``; see the module docstring."""

    def __init__(self, root: str | Path | None, source_key: str):
        self.dir = Path(root) / source_key if root is not None else None
        self.layout: dict[str, list[int]] | None = None
        self.computed = self.reused = 0
        if self.dir is not None and (self.dir / LAYOUT_FILE).is_file():
            try:
                self.layout = {k: list(v) for k, v in json.loads((self.dir / LAYOUT_FILE).read_text()).items()}
            except (json.JSONDecodeError, AttributeError, TypeError):
                self.layout = None  # rewritten by the next image computed

    def _path(self, image_path: Path) -> Path:
        return self.dir / f"{file_identity(image_path)}.npy"

    def get(self, image_path: str | Path, compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.dir is None:
            self.computed += 1
            return round_trip(compute())
        path = self._path(Path(image_path))
        cached = self._load(path)
        if cached is not None:
            self.reused += 1
            return cached
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in compute().items()}
        self._check_layout(arrays)
        flat = np.concatenate([a.ravel() for a in arrays.values()]).astype(stored_dtype(arrays))

        def write(tmp):
            with open(tmp, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
                np.save(f, flat, allow_pickle=False)

        atomic_write_bytes(path, write)
        self.computed += 1
        return self._load(path)

    def _check_layout(self, arrays: Mapping[str, np.ndarray]) -> None:
        layout = {k: list(v.shape) for k, v in arrays.items()}
        if self.layout is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(layout).encode()
            atomic_write_bytes(self.dir / LAYOUT_FILE, lambda tmp: Path(tmp).write_bytes(payload))
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(f"features of this source changed shape ({layout} vs the cached {self.layout}): the "
                             f"cache {self.dir} belongs to other settings; delete it or use another --cache")

    def _load(self, path: Path) -> dict[str, np.ndarray] | None:
        if self.layout is None or not path.is_file():
            return None
        try:
            flat = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):  # cut short by a kill: compute again
            return None
        sizes = [int(np.prod(s)) for s in self.layout.values()]
        if flat.ndim != 1 or flat.shape[0] != sum(sizes):
            return None
        out, start = {}, 0
        for (name, shape), size in zip(self.layout.items(), sizes):
            out[name] = flat[start:start + size].reshape(shape)
            start += size
        return out
