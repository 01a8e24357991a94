"""The manifest: an append-only journal of what a run committed, so a killed run resumes without
re-reading its outputs.

``DIR/manifest-<format>.jsonl`` holds one JSON object per line: first the header (the
``RunConfig`` every later run must match), then one record per committed batch or shard::

    {"files": [[key, output], ...], "failed": [[key, path, reason], ...]}   per-image formats
    {"shard": "shard-<hash>.safetensors", "images": [key, ...], "failed": [...]}  shards

Outputs are written (atomically) before the record that names them, and a record counts only
once its closing newline is on disk: a kill mid-append leaves a cut-short last line, which the
next run drops (rewriting the file atomically); a kill between an output and its record leaves
an output nobody lists, which the next run finds on disk (``files.adopt`` / ``shards.adopt``) or
writes again. An image belongs to the first record that lists it, so none is counted twice.
Failed images are listed for the user and retried by the next run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from .inputs import RunConfig

KIND = "cleandift-rt-extract"
VERSION = 1
# Facts a resumed run must share with the folder's features (the rest of the header is informative)
MUST_MATCH = ("format", "taps", "shapes", "input_size", "resize", "precision", "engine", "engine_bytes")


def manifest_path(out: Path, fmt: str) -> Path:
    return Path(out) / f"manifest-{fmt}.jsonl"


def _read_records(path: Path) -> tuple[list[dict], bytes | None]:
    """The complete records, and the bytes to keep when the file ends in a cut-short or corrupt line
    (None: the file is whole)."""
    data = path.read_bytes()
    records, kept = [], 0
    while kept < len(data):
        end = data.find(b"\n", kept)
        if end < 0:
            break  # a line without its newline was cut short: not committed
        try:
            record = json.loads(data[kept:end])
        except (json.JSONDecodeError, UnicodeDecodeError):
            break  # a damaged line: it and anything after it is treated as never written
        if not isinstance(record, dict):
            break
        records.append(record)
        kept = end + 1
    return records, (None if kept == len(data) else data[:kept])


def _line(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class Manifest:
    """An open manifest: what is done (key -> output file or shard), what failed, and appends."""

    def __init__(self, path: Path, config: dict, records: list[dict]):
        self.path, self.config = path, config
        self.done: dict[str, str] = {}
        self.rows: dict[str, int] = {}  # shards: the row of each key in its shard
        self.shards: list[str] = []
        self.failed: dict[str, tuple[str, str]] = {}  # key -> (path, reason)
        self._file = None
        for record in records:
            self._apply(record)

    @classmethod
    def open(cls, out, config: RunConfig, log=print) -> Manifest:
        """Load (trimming a cut-short last line) or create the manifest of ``config.format`` in ``out``."""
        path = manifest_path(out, config.format)
        wanted = config.to_dict()
        records = []
        if path.exists():
            records, keep = _read_records(path)
            if keep is not None:
                log(f"{path.name}: dropped a cut-short last record (a run was killed while writing it)")
                atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(keep))
        if records:
            header = records[0]
            if header.get("manifest") != KIND:
                raise ValueError(f"{path} is not a cleandift-rt extraction manifest: move it away or use another --out")
            _check_same_run(path, header.get("config", {}), wanted)
            records = records[1:]
        else:
            header = {"manifest": KIND, "version": VERSION, "config": wanted}
            atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(_line(header)))
        return cls(path, header["config"], records)

    def _apply(self, record: dict) -> None:
        if "files" in record:
            for key, output in record["files"]:
                self._mark_done(key, output)
        if "shard" in record:
            name = record["shard"]
            self.shards.append(name)
            for row, key in enumerate(record.get("images", [])):
                if self._mark_done(key, name):
                    self.rows[key] = row
        for key, path, reason in record.get("failed", []):
            if key not in self.done:
                self.failed[key] = (path, reason)

    def _mark_done(self, key: str, output: str) -> bool:
        self.failed.pop(key, None)
        if key in self.done:  # the first record that lists an image owns it
            return False
        self.done[key] = output
        return True

    def append(self, record: dict) -> None:
        """Commit ``record``: written in one call and flushed to disk before this returns."""
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(_line(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._apply(record)

    def record_files(self, files, failed=()) -> None:
        self.append({"files": [list(f) for f in files], "failed": [list(f) for f in failed]})

    def record_shard(self, name: str, keys, failed=()) -> None:
        self.append({"shard": name, "images": list(keys), "failed": [list(f) for f in failed]})

    def record_failed(self, failed) -> None:
        if failed:
            self.append({"failed": [list(f) for f in failed]})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_manifest(out, fmt: str) -> Manifest | None:
    """The manifest of ``fmt`` in ``out`` for reading (no trimming, no writing), or None."""
    path = manifest_path(out, fmt)
    if not path.exists():
        return None
    records, _ = _read_records(path)
    if not records or records[0].get("manifest") != KIND:
        raise ValueError(f"{path} is not a cleandift-rt extraction manifest")
    return Manifest(path, records[0].get("config", {}), records[1:])


def _check_same_run(path: Path, have: dict, wanted: dict) -> None:
    differ = [k for k in MUST_MATCH if have.get(k) != wanted.get(k)]
    if differ:
        detail = "; ".join(f"{k}: folder {have.get(k)!r}, this run {wanted.get(k)!r}" for k in differ)
        raise ValueError(f"{path.parent} holds features of another run ({detail}): use another --out, or the same "
                         "engine and options to resume")
