"""Per-image outputs (``--format safetensors`` / ``npz``): one file per image, named after the
image's full name (``sub/a.jpg`` -> ``sub/a.jpg.safetensors``), so two images never share one; and
what every writer of the extractor shares: turning a write failure into a one-line error.

A safetensors output records in its metadata the run's identity (``RunConfig.identity``) and the
digest of the image it was made from, so an output a killed run wrote before its manifest record
is taken by the next run only when both still match (``adopt``). An ``.npz`` records neither and
is never taken without its record; neither are files of the naming scheme before issue 18
(``sub/a.safetensors``), whose engine cannot be proven: they are left where they are, unread, and
the images are extracted again under their own names.

``verify`` is what a resumed run checks before it counts an output done: the file exists, its
header parses, its tensors have this run's shapes and its digest is the one recorded when it was
written (a file cut short, replaced or deleted is extracted again).
"""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write_bytes, content_digest
from .inputs import Item, RunConfig, input_digest

SUFFIX = {"safetensors": ".safetensors", "npz": ".npz"}
FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def output_name(key: str, fmt: str) -> str:
    """The output of image ``key``, relative to the output folder."""
    return key + SUFFIX[fmt]


def write_failure(exc: BaseException, out, done: int) -> OSError | None:
    """The one-line error for a writer that cannot go on (the disk or the quota is full), or None
    when ``exc`` is something else. safetensors reports a full disk as its own error type."""
    full = isinstance(exc, OSError) and exc.errno in FULL
    full = full or any(text in str(exc) for text in _FULL_TEXT)
    if not full:
        return None
    return OSError(errno.ENOSPC, f"the disk holding {out} is full (or its quota is used up) after {done} image(s) were "
                                 "written: free space and rerun the same command, it resumes where it stopped")


def name_too_long(exc: BaseException) -> bool:
    """An output name the file system refuses (one image's problem: it is listed as failed)."""
    return isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG


def write_image_features(out, item: Item, features: dict, size, config: RunConfig,
                         digest: str | None) -> tuple[str, str]:
    """Write one image's ``{tap: C x h x w}`` made from the bytes ``digest`` names; returns the output's
    name relative to ``out`` and the output's own digest (recorded in the manifest)."""
    name = output_name(item.key, config.format)
    arrays = {t: np.ascontiguousarray(features[t]) for t in config.taps}
    path = Path(out) / name
    if config.format == "safetensors":
        from safetensors.numpy import save_file

        meta = {"image": item.path, "key": item.key, "width": str(size[0]), "height": str(size[1]),
                "engine": config.engine, "taps": ",".join(config.taps), "input_size": "x".join(map(str, config.input_size)),
                "run": config.identity(), "input_digest": digest or ""}
        atomic_write_bytes(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write_bytes(path, write)
    return name, content_digest(path)


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


def _facts(path: Path, config: RunConfig) -> tuple[dict, dict]:
    """(metadata, {tap: shape}) from the header; raises on a file that is not one."""
    if config.format == "safetensors":
        return _safetensors_facts(path)
    return {}, _npz_shapes(path)


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the name itself is too long for the file system (it raises)."""
    try:
        return path.is_file()
    except OSError:
        return False


def verify(path: Path, config: RunConfig, digest: str | None) -> str | None:
    """Why the output at ``path`` cannot be counted done (None: it can)."""
    if not _is_file(path):
        return "its output is missing"
    try:
        _, shapes = _facts(path, config)
    except Exception:  # noqa: BLE001 - any unreadable header: the file is damaged
        return "its output's header does not parse (cut short or damaged)"
    wrong = [t for t in config.taps if shapes.get(t) != tuple(config.shapes[t])]
    if wrong:
        return f"its output lacks or mis-shapes tap(s) {', '.join(wrong)}"
    if digest is None:
        return "its output has no recorded digest"
    if content_digest(path) != digest:
        return "its output changed since it was written"
    return None


def adopt(out, items: list[Item], done: dict, config: RunConfig) -> list[tuple[str, str, str, str]]:
    """``(key, output, input digest, output digest)`` for images not in the manifest whose output a
    killed run wrote before its record: taken only when the file names this run and this image's
    current digest, and its header and shapes check out."""
    if config.format != "safetensors":
        return []
    out, run, found = Path(out), config.identity(), []
    for item in items:
        path = out / output_name(item.key, config.format)
        if item.key in done or not _is_file(path):
            continue
        try:
            meta, shapes = _safetensors_facts(path)
            digest = input_digest(item.path)
        except Exception:  # noqa: BLE001 - a half-written or foreign file, or an input gone: extract again
            continue
        if meta.get("run") != run or meta.get("input_digest") != digest or meta.get("key") != item.key:
            continue
        if all(shapes.get(t) == tuple(config.shapes[t]) for t in config.taps):
            found.append((item.key, output_name(item.key, config.format), digest, content_digest(path)))
    return found
