"""Starting or resuming a run in an output folder: one run per folder (a lock), the manifest,
what killed writes left removed, every image the manifest counts done verified (``verify``: its
input unchanged, its output whole), outputs that a killed run wrote but did not record found, and
what is left to do. The local extractor and the Ray pipeline share it, so they resume alike."""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..checkpoint import check_output_folder, remove_stale_temporaries
from . import files, shards
from .inputs import Item, RunConfig, input_digest
from .manifest import Manifest

SHOWN = 3  # examples per reason in the redo note


@dataclass
class Summary:
    """What a run did: images given, extracted now, skipped as already done (of which ``found``
    were found on disk: outputs a killed run wrote before their record), extracted again because
    their input changed or their output was missing or damaged (``redone``, with the reason),
    unreadable ones with the reason, and the seconds it took."""

    images: int
    done: int = 0
    skipped: int = 0
    found: int = 0
    failed: list = field(default_factory=list)  # [(path, reason)]
    redone: list = field(default_factory=list)  # [(key, reason)]
    seconds: float = 0.0
    out: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [list(f) for f in self.failed]
        d["redone"] = [list(r) for r in self.redone]
        return d


@dataclass
class Run:
    out: Path
    manifest: Manifest
    todo: list[Item]
    summary: Summary
    _lock: int

    def close(self) -> None:
        self.manifest.close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the folder lock
            self._lock = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _lock_folder(out: Path) -> int:
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another extraction is writing to {out}: wait for it, or use another --out") from None
    return fd


def _digest_now(path: str) -> str:
    try:
        return input_digest(path)
    except (OSError, ValueError) as exc:  # gone, or no longer a readable file: its features are stale
        return f"unreadable: {exc}"


def verify(out: Path, items: list[Item], manifest: Manifest, config: RunConfig) -> tuple[list, list]:
    """``([(key, reason)], [shard names])``: images the manifest counts done that must be extracted
    again (input changed, output missing, cut short, mis-shaped or changed) and the damaged shards
    that go with them. Reads at most 128 KiB of each image and output (``content_digest``)."""
    redo: dict[str, str] = {}
    drop = []
    if config.format == "shards":
        owners: dict[str, list[str]] = {}
        for key, name in manifest.done.items():
            owners.setdefault(name, []).append(key)
        for name, keys in owners.items():
            why = shards.verify_shard(out / name, config, manifest.digests.get(name))
            if why is not None:
                drop.append(name)
                redo.update((k, why) for k in keys)
    for item in items:
        output = manifest.done.get(item.key)
        if output is None or item.key in redo:
            continue
        if config.format != "shards":
            why = files.verify(out / output, config, manifest.digests.get(output))
            if why is not None:
                redo[item.key] = why
                continue
        recorded = manifest.inputs.get(item.key)
        if recorded is None or _digest_now(item.path) != recorded:
            redo[item.key] = "its image changed since it was extracted" if recorded else "no recorded input digest"
    return sorted(redo.items()), drop


def redo_note(redo: list) -> str:
    """One line: how many images are extracted again, by reason, with examples."""
    reasons: dict[str, list[str]] = {}
    for key, why in redo:
        reasons.setdefault(why, []).append(key)
    parts = [f"{len(keys)} because {why} (e.g. {', '.join(keys[:SHOWN])})" for why, keys in reasons.items()]
    return f"extracting {len(redo)} image(s) again: " + "; ".join(parts)


def open_run(out, items: list[Item], config: RunConfig, log=print) -> Run:
    """Lock ``out``, open its manifest, verify what it counts done and work out what is left to do
    (the caller closes the Run)."""
    out = check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out)
    try:
        manifest = Manifest.open(out, config, log)
        # no writer can be active here (the lock): whatever temporaries exist, a killed write left
        folders = {out}
        if config.format != "shards":
            folders |= {out / PurePosixPath(i.key).parent for i in items}
        for folder in folders:
            remove_stale_temporaries(folder)
        redo, drop = verify(out, items, manifest, config)
        if redo or drop:
            manifest.record_redo([k for k, _ in redo], drop)
            for name in drop:
                (out / name).unlink(missing_ok=True)  # damaged or changed: its images are written again
            log(redo_note(redo))
        skipped_before = sum(1 for i in items if i.key in manifest.done)
        if config.format == "shards":
            paths = {i.key: i.path for i in items}
            shards.adopt(out, manifest, config, lambda key: _digest_now(paths[key]) if key in paths else None, log)
        else:
            adopted = files.adopt(out, items, manifest.done, config)
            if adopted:
                manifest.record_files(adopted)
    except BaseException:
        os.close(lock)
        raise
    todo = [i for i in items if i.key not in manifest.done]
    skipped = len(items) - len(todo)
    summary = Summary(images=len(items), skipped=skipped, found=skipped - skipped_before, redone=redo, out=str(out))
    return Run(out, manifest, todo, summary, lock)
