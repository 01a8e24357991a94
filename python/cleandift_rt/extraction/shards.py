"""The shard format (``--format shards``) and its reader.

A shard is a plain safetensors file ``shard-<hash>.safetensors`` holding, for N images, one
tensor per tap of shape ``N x C x h x w`` and these metadata strings: ``format``
(``cleandift-rt-shard``), ``version``, ``keys`` / ``paths`` (JSON lists: each row's key and
source path), ``sizes`` (JSON list of the original ``[width, height]``), ``taps``, ``input_size``,
``engine``, ``run`` (the run's identity) and ``inputs`` (JSON list: the digest of each row's
image). Its name hashes its keys, so writing the same rows again (a retried task) replaces the
file instead of duplicating it. The run's manifest lists the committed shards with their digests;
``read_shards`` follows it; a resumed run verifies each (``verify_shard``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write_bytes, content_digest
from ..checks import loads_json
from .inputs import RunConfig
from .manifest import Manifest, read_manifest

SHARD_FORMAT = "cleandift-rt-shard"
SHARD_VERSION = "1"
SHARD_GLOB = "shard-*.safetensors"
MAX_SHARD_IMAGES = 4096
SHARD_BYTES = 1 << 30  # features held in memory while a shard fills, per writer


def default_shard_images(config: RunConfig) -> int:
    """A few thousand images per shard, fewer where the features are large (at most ~1 GiB each)."""
    return max(1, min(MAX_SHARD_IMAGES, SHARD_BYTES // max(1, config.bytes_per_image())))


def shard_name(keys) -> str:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    return f"shard-{digest}.safetensors"


def write_shard(out, rows: list[dict], config: RunConfig) -> str:
    """Write one shard of ``rows`` ({"key", "path", "size": (w, h), "features": {tap: C x h x w}},
    and "digest": the image's ``input_digest``); returns its file name."""
    from safetensors.numpy import save_file

    keys = [r["key"] for r in rows]
    tensors = {t: np.ascontiguousarray(np.stack([r["features"][t] for r in rows])) for t in config.taps}
    meta = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "keys": json.dumps(keys),
            "paths": json.dumps([str(r["path"]) for r in rows]),
            "sizes": json.dumps([[int(v) for v in r["size"]] for r in rows]), "taps": ",".join(config.taps),
            "input_size": "x".join(map(str, config.input_size)), "engine": config.engine, "run": config.identity(),
            "inputs": json.dumps([r.get("digest") for r in rows])}
    name = shard_name(keys)
    atomic_write_bytes(Path(out) / name, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return name


def shard_record(out, name: str, rows: list[dict]) -> dict:
    """The manifest record of a shard just written: its images, their input digests, its digest."""
    return {"shard": name, "images": [r["key"] for r in rows], "inputs": [r.get("digest") for r in rows],
            "digest": content_digest(Path(out) / name)}


def verify_shard(path: Path, config: RunConfig, digest: str | None) -> str | None:
    """Why a listed shard cannot be read back as written (None: it can): missing, a header that does
    not parse, shapes other than its rows x this run's, or a digest other than the recorded one."""
    if not path.is_file():
        return f"shard {path.name} is missing"
    try:
        meta, shapes = shard_header(path)
        rows = len(loads_json(meta["keys"], f"{path.name} keys"))
    except Exception:  # noqa: BLE001 - any unreadable header: the file is damaged
        return f"shard {path.name} does not parse (cut short or damaged)"
    if any(shapes.get(t) != (rows, *config.shapes[t]) for t in config.taps):
        return f"shard {path.name} lacks or mis-shapes this run's taps"
    if digest is None or content_digest(path) != digest:
        return f"shard {path.name} changed since it was written"
    return None


def shard_header(path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, {tap: shape}) of a shard, read from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if meta.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a cleandift-rt shard (no '{SHARD_FORMAT}' metadata)")
    return meta, shapes


def adopt(out, manifest: Manifest, config: RunConfig, current=lambda key: None, log=print) -> int:
    """Record shards that a killed run wrote but did not list; returns the number of images found.

    A shard is taken only when it names this run and each row's input digest is the image's
    digest now (``current(key)``; None where it cannot be known: a streamed Ray dataset). One whose
    images are all listed elsewhere, or made from images that changed since, is this run's debris
    and deleted; one that is not ours (foreign, damaged, another run's) is left alone, named in the
    log, and never read."""
    listed = set(manifest.shards)
    found = 0
    for path in sorted(Path(out).glob(SHARD_GLOB)):
        if path.name in listed:
            continue
        try:
            meta, shapes = shard_header(path)
            keys = loads_json(meta["keys"], f"{path.name} keys")
            inputs = loads_json(meta.get("inputs", "null"), f"{path.name} inputs") or [None] * len(keys)
            ours = meta.get("run") == config.identity() and len(inputs) == len(keys) and all(
                tuple(shapes.get(t, ())) == (len(keys), *config.shapes[t]) for t in config.taps)
        except Exception as exc:  # noqa: BLE001 - a foreign or damaged file: reported, never used
            log(f"ignoring {path.name}: not a shard of this run ({str(exc).splitlines()[0]})")
            continue
        if not ours:
            log(f"ignoring {path.name}: written by another run (other engine, taps or input size)")
            continue
        new = [k for k in keys if k not in manifest.done]
        changed = [k for k, d in zip(keys, inputs) if (now := current(k)) is not None and now != d]
        if not new or changed:
            if changed:
                log(f"removed {path.name}: made from {len(changed)} image(s) that changed since (e.g. {changed[0]})")
            path.unlink()
            continue
        rows = [{"key": k, "digest": d} for k, d in zip(keys, inputs)]
        manifest.record_shard(shard_record(out, path.name, rows))
        found += len(new)
    return found


def read_shards(out, taps=None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(image_path, {tap: C x h x w array})`` for every image of a shards folder, each once.

    Follows the folder's manifest (the committed shards, in the order written); without one it
    reads every shard file it finds. ``taps`` selects arrays (default: all). Memory stays at one
    image's features: rows are read from the files one at a time."""
    from safetensors import safe_open

    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a folder of shards")
    manifest = read_manifest(out, "shards")
    names = manifest.shards if manifest else sorted(p.name for p in out.glob(SHARD_GLOB))
    if not names:
        raise ValueError(f"{out} holds no shards ({SHARD_GLOB}): was it written by `cleandift-rt extract "
                         "--format shards`?")
    seen: set[str] = set()
    for name in dict.fromkeys(names):
        path = out / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing: the folder is incomplete")
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SHARD_FORMAT:
                raise ValueError(f"{path} is not a cleandift-rt shard")
            keys, paths = loads_json(meta["keys"], f"{path} keys"), loads_json(meta["paths"], f"{path} paths")
            wanted = list(f.keys()) if taps is None else list(taps)
            missing = [t for t in wanted if t not in f.keys()]
            if missing:
                raise ValueError(f"{path} has no taps {missing} (it has {', '.join(f.keys())})")
            slices = {t: f.get_slice(t) for t in wanted}
            for row, (key, image_path) in enumerate(zip(keys, paths)):
                owner = manifest.done.get(key) if manifest else None
                if key in seen or (manifest and (owner != name or manifest.rows.get(key) != row)):
                    continue  # listed by an earlier shard: each image once
                seen.add(key)
                yield image_path, {t: s[row] for t, s in slices.items()}
