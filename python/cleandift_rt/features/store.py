"""The per-image feature store of every system on the features: evaluation and fusion, GATE,
hyperfeatures and the probes.

Layout: ``ROOT/<folder>/<entry>.safetensors`` holds one entry's named arrays (:meth:`FeatureStore.get`),
``ROOT/<folder>/<entry>.npy`` one array (:meth:`FeatureStore.get_array`: maps that other tools read with
``np.load``). A folder is usually a feature source's ``key`` (the model and every setting that changes
its output), an entry an image (:func:`image_key`: the file's path, size and modification time, and
the category where the features depend on it), so a changed model, setting or image is computed again.

What the store guarantees:

- **atomic writes**: a temporary file in the same folder, then ``os.replace`` over the name; a
  reader (or a run killed and started again) sees the old file or the new one, never half of one;
- **memory-mapped reads**, copy-on-write: a rerun reads only the pages it touches, the arrays are
  writable (``torch.from_numpy`` takes them) and a write to them never reaches the file;
- **cut-short files are computed again**: a file whose header or data is incomplete or corrupt (a
  kill during a copy, a full disk) reads as missing;
- **one rounding**: what :meth:`get` returns is what the disk holds, also with ``root=None`` (nothing
  stored), so a run gives the same numbers with and without the store.

The fp16 policy, the same for every user: with ``dtype="float16"`` an entry is stored in float16
when every value lies within +-``FP16_MAX`` (65504, float16's largest finite value) and in float32
otherwise, that entry only. Raising would stop a training run of hours on one image with a large
activation; storing the overflow would turn it into inf (and a cosine similarity into NaN) without
a word; clamping would change values silently. The float32 fallback costs twice the disk for the
rare entries that need it and keeps every value exact. ``dtype="float32"`` stores float32 and
``None`` stores the arrays as computed (label maps, and caches that must not change a bit).
"""

from __future__ import annotations

import json
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes, file_identity, short_hash

FP16_MAX = 65504.0  # float16's largest finite value
DTYPES = ("float16", "float32", None)

# safetensors dtype names -> numpy (bfloat16 has no numpy type: such a file reads as missing)
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def image_key(image_path: str | Path, category: str = "", variant: str = "") -> str:
    """The entry name of an image file: its identity (path, size, modification time) and the
    category when the features depend on it, then ``variant`` (e.g. ``"-flip"`` for its mirror)."""
    return short_hash(file_identity(image_path), category) + variant


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def round_trip(arrays: Mapping[str, object], dtype: str | None = "float16") -> dict[str, np.ndarray]:
    """``arrays`` (numpy arrays or tensors) as the store keeps them at ``dtype`` (module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype is None:
        return {k: np.ascontiguousarray(_as_numpy(v)) for k, v in arrays.items()}
    wide = {k: np.ascontiguousarray(_as_numpy(v), dtype=np.float32) for k, v in arrays.items()}
    # a NaN compares False, so it keeps its entry float32 like an overflow
    if dtype == "float16" and all(np.abs(v).max(initial=0.0) <= FP16_MAX for v in wide.values()):
        return {k: v.astype(np.float16) for k, v in wide.items()}
    return wide


def _write_entry(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> None:
    from safetensors.numpy import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, lambda tmp: save_file(dict(arrays), tmp, metadata=meta))


def _read_entry(path: Path) -> dict[str, np.ndarray] | None:
    """The named arrays of a safetensors file, memory-mapped; None when it is missing, cut short or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if length <= 0 or 8 + length > size:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):  # missing, unreadable, or a header that is not JSON
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    start = 8 + length
    data = np.asarray(np.memmap(path, np.uint8, mode="c", offset=start)) if size > start else np.empty(0, np.uint8)
    arrays = {}
    for name, spec in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
            shape = tuple(int(n) for n in spec["shape"])
            low, high = (int(n) for n in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 <= low <= high <= data.size or high - low != dtype.itemsize * math.prod(shape):
            return None
        arrays[name] = data[low:high].view(dtype).reshape(shape)
    return arrays


def _write_array(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
            np.save(f, array, allow_pickle=False)

    atomic_write_bytes(path, write)


def _read_array(path: Path) -> np.ndarray | None:
    """A ``.npy`` file memory-mapped; None when it is missing, cut short or corrupt."""
    if not path.is_file():
        return None
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError):  # a header or data cut short
        return None


class FeatureStore:
    """Per-image arrays computed once and read back memory-mapped (see the module docstring).

    ``root=None`` stores nothing (values still rounded as stored); ``dtype`` is the fp16 policy's
    setting; ``memory_items`` keeps the last few entries in memory too (a run that reads each image
    for several pairs). ``computed`` and ``reused`` count entries per ``label`` (default: the folder).
    """

    def __init__(self, root: str | Path | None, dtype: str | None = "float16", memory_items: int = 0):
        if dtype not in DTYPES:
            raise ValueError(f"feature store dtype must be one of {DTYPES}, got {dtype!r}")
        self.root = Path(root) if root is not None else None
        self.dtype = dtype
        self.memory_items = memory_items
        self.memory: OrderedDict[tuple, object] = OrderedDict()
        self.computed: Counter = Counter()
        self.reused: Counter = Counter()

    def path(self, folder: str, entry: str) -> Path:
        """Where :meth:`get` keeps an entry (needs a root)."""
        return self._file(folder, entry, ".safetensors")

    def array_path(self, folder: str, entry: str) -> Path:
        """Where :meth:`get_array` keeps an entry (needs a root)."""
        return self._file(folder, entry, ".npy")

    def _file(self, folder: str, entry: str, suffix: str) -> Path:
        if self.root is None:
            raise ValueError("this feature store keeps nothing on disk (root None): give it a folder")
        return self.root / folder / f"{entry}{suffix}"

    def load(self, folder: str, entry: str) -> dict[str, np.ndarray] | None:
        """The stored arrays of an entry, or None when it is not (completely) there."""
        return _read_entry(self.path(folder, entry)) if self.root is not None else None

    def load_array(self, folder: str, entry: str) -> np.ndarray | None:
        return _read_array(self.array_path(folder, entry)) if self.root is not None else None

    def has(self, folder: str, entry: str) -> bool:
        return self.load(folder, entry) is not None

    def has_array(self, folder: str, entry: str) -> bool:
        return self.load_array(folder, entry) is not None

    def get(self, folder: str, entry: str, compute: Callable[[], Mapping[str, object]], *, label: str | None = None,
            metadata: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """The entry's named arrays; ``compute()`` (``{name: array or tensor}``) runs and its result is
        stored first when they are not there. ``metadata`` goes into the file's header."""
        def store(arrays):
            if self.root is None:
                return arrays
            _write_entry(self.path(folder, entry), arrays, metadata)
            return self.load(folder, entry) or arrays

        found = self._fetch(".safetensors", folder, entry, label, lambda: self.load(folder, entry),
                            lambda: store(round_trip(compute(), self.dtype)))
        return dict(found)

    def get_array(self, folder: str, entry: str, compute: Callable[[], object], *,
                  label: str | None = None) -> np.ndarray:
        """The entry's one array (a ``.npy`` file), computed and stored first when it is not there."""
        def store(array):
            if self.root is None:
                return array
            _write_array(self.array_path(folder, entry), array)
            stored = self.load_array(folder, entry)
            return stored if stored is not None else array

        return self._fetch(".npy", folder, entry, label, lambda: self.load_array(folder, entry),
                           lambda: store(round_trip({"": compute()}, self.dtype)[""]))

    def _fetch(self, kind: str, folder: str, entry: str, label: str | None, load, compute):
        label = folder if label is None else label
        remembered = (kind, folder, entry)
        value = self.memory.get(remembered)
        if value is not None:
            self.memory.move_to_end(remembered)
        else:
            value = load()
        if value is None:
            value = compute()
            self.computed[label] += 1
        else:
            self.reused[label] += 1
        if self.memory_items:
            self.memory[remembered] = value
            while len(self.memory) > self.memory_items:
                self.memory.popitem(last=False)
        return value
