"""Per-image outputs (``--format safetensors`` / ``npz``): one file per image, named after the
image's full name (``sub/a.jpg`` -> ``sub/a.jpg.safetensors``), so two images never share one.

Folders from before this scheme (``sub/a.safetensors``) still resume: a file of the old name is
taken for an image only when it provably belongs to it. A safetensors file names its image in its
metadata; an ``.npz`` does not, so an old ``a.npz`` is taken only when no other image of that
folder has the stem ``a``. When two images collided in the old scheme (``a.jpg`` and ``a.png``
both wrote ``a.safetensors``, the second overwriting the first), the file goes to the image it
names and the other is extracted again; an ambiguous ``a.npz`` goes to neither. Old files are left
where they are: the manifest records which file holds each image.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from ..checkpoint import atomic_write_bytes
from .inputs import Item, RunConfig

SUFFIX = {"safetensors": ".safetensors", "npz": ".npz"}


def output_name(key: str, fmt: str) -> str:
    """The output of image ``key``, relative to the output folder."""
    return key + SUFFIX[fmt]


def old_output_name(key: str, fmt: str) -> str:
    """The name the scheme before issue 18 gave it (the image suffix replaced)."""
    return str(PurePosixPath(key).with_suffix(SUFFIX[fmt]))


def write_image_features(out, item: Item, features: dict, size, config: RunConfig) -> str:
    """Write one image's ``{tap: C x h x w}``; returns the output's name relative to ``out``."""
    name = output_name(item.key, config.format)
    arrays = {t: np.ascontiguousarray(features[t]) for t in config.taps}
    path = Path(out) / name
    if config.format == "safetensors":
        from safetensors.numpy import save_file

        meta = {"image": item.path, "key": item.key, "width": str(size[0]), "height": str(size[1]),
                "engine": config.engine, "taps": ",".join(config.taps), "input_size": "x".join(map(str, config.input_size))}
        atomic_write_bytes(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write_bytes(path, write)
    return name


def _safetensors_facts(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an .npz from the .npy headers, without reading the data."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for entry in z.namelist():
            if entry.endswith(".npy"):
                with z.open(entry) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, _ = read_header(f)
                shapes[entry[:-4]] = tuple(shape)
    return shapes


def _holds_features(path: Path, item: Item, config: RunConfig, need_name: bool) -> bool:
    """Whether the file at ``path`` holds this run's features of ``item`` (read from its header)."""
    try:
        if config.format == "safetensors":
            meta, shapes = _safetensors_facts(path)
            named = meta.get("image")
            if named is not None and PurePosixPath(Path(named).as_posix()).name != PurePosixPath(item.key).name:
                return False  # written for another image (an old-scheme collision)
            if named is None and need_name:
                return False
            if meta.get("input_size", "x".join(map(str, config.input_size))) != "x".join(map(str, config.input_size)):
                return False
        else:
            shapes = _npz_shapes(path)
    except Exception:  # noqa: BLE001 - half-written or foreign file: extract again
        return False
    return all(shapes.get(t) == tuple(config.shapes[t]) for t in config.taps)


def adopt(out, items: list[Item], done: dict, config: RunConfig) -> list[tuple[str, str]]:
    """(key, output) for images not in the manifest whose features are already on disk: written by
    a run killed before its manifest record, or by the old naming scheme."""
    out = Path(out)
    stems = Counter((PurePosixPath(i.key).parent, PurePosixPath(i.key).stem) for i in items)
    found = []
    for item in items:
        if item.key in done:
            continue
        new = output_name(item.key, config.format)
        if (out / new).is_file() and _holds_features(out / new, item, config, need_name=False):
            found.append((item.key, new))
            continue
        old = old_output_name(item.key, config.format)
        key = PurePosixPath(item.key)
        unambiguous = stems[(key.parent, key.stem)] == 1
        # an old .npz cannot say whose it is: only an image without a same-stem sibling may take it
        if (out / old).is_file() and (config.format == "safetensors" or unambiguous) \
                and _holds_features(out / old, item, config, need_name=not unambiguous):
            found.append((item.key, old))
    return found
