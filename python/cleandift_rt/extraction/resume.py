"""Starting or resuming a run in an output folder: one run per folder (a lock), the manifest,
what killed writes left removed, outputs that a killed run wrote but did not record found, and
what is left to do. The local extractor and the Ray pipeline share it, so they resume alike."""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from ..checkpoint import check_output_folder, remove_stale_temporaries
from . import files, shards
from .inputs import Item, RunConfig
from .manifest import Manifest


@dataclass
class Summary:
    """What a run did: images given, extracted now, skipped as already done (of which ``found``
    were found on disk: old-scheme files or outputs of a killed run), unreadable ones with the
    reason, and the seconds it took."""

    images: int
    done: int = 0
    skipped: int = 0
    found: int = 0
    failed: list = field(default_factory=list)  # [(path, reason)]
    seconds: float = 0.0
    out: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = [list(f) for f in self.failed]
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


def open_run(out, items: list[Item], config: RunConfig, log=print) -> Run:
    """Lock ``out``, open its manifest and work out what is left to do (the caller closes the Run)."""
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
        skipped_before = sum(1 for i in items if i.key in manifest.done)
        if config.format == "shards":
            shards.adopt(out, manifest, config, log)
        else:
            adopted = files.adopt(out, items, manifest.done, config)
            if adopted:
                manifest.record_files(adopted)
    except BaseException:
        os.close(lock)
        raise
    todo = [i for i in items if i.key not in manifest.done]
    skipped = len(items) - len(todo)
    summary = Summary(images=len(items), skipped=skipped, found=skipped - skipped_before, out=str(out))
    return Run(out, manifest, todo, summary, lock)
