"""The manifest: an append-only journal of what a run committed, so a killed run resumes where it
stopped, and of what each output was made from, so a resumed run checks instead of trusting.

``DIR/manifest-<format>.jsonl`` holds one JSON object per line: first the header (the
``RunConfig`` every later run must match: taps, sizes, precision, prompt, the content digest of
the engine and its base model), then one record per committed batch, shard or redo::

    {"files": [[key, output, input digest, output digest], ...], "failed": [[key, path, reason], ...]}
    {"shard": "shard-<hash>.safetensors", "images": [key, ...], "inputs": [digest, ...], "digest": d, "failed": [...]}
    {"redo": [key, ...], "drop": [shard name, ...]}   what a resumed run found changed or damaged

Outputs are written (atomically) before the record that names them, and a record counts only
once its closing newline is on disk: a kill mid-append leaves a cut-short last line, which the
next run drops (rewriting the file atomically); a kill between an output and its record leaves
an output nobody lists, which the next run takes only when it proves to be this run's
(``files.adopt`` / ``shards.adopt``) or writes again. An image belongs to the first record that
lists it after its last redo, so none is counted twice. Failed images are listed for the user and
retried by the next run. A resumed run verifies every image it would skip (``resume.verify``): its
input digest, its output's header, shapes and digest; what fails is redone and said so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..checks import loads_json
from .inputs import RunConfig

KIND = "cleandift-rt-extract"
VERSION = 2  # 2: content digests of the engine, the inputs and the outputs (1 trusted names and sizes)
# Facts a resumed run must share with the folder's features (the rest of the header is informative)
MUST_MATCH = ("format", "taps", "shapes", "input_size", "resize", "precision", "engine_digest", "prompt")


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
            record = loads_json(data[kept:end], f"{path.name} line")
        except ValueError:
            break  # a damaged line: it and anything after it is treated as never written
        if not isinstance(record, dict):
            break
        records.append(record)
        kept = end + 1
    return records, (None if kept == len(data) else data[:kept])


def _line(record: dict) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class Manifest:
    """An open manifest: what is done (key -> output file or shard) and what it was made from (input
    digests, output digests), what failed, and appends."""

    def __init__(self, path: Path, config: dict, records: list[dict]):
        self.path, self.config = path, config
        self.done: dict[str, str] = {}
        self.inputs: dict[str, str | None] = {}  # key -> digest of the image its output was made from
        self.digests: dict[str, str | None] = {}  # output file or shard -> its digest when written
        self.rows: dict[str, int] = {}  # shards: the row of each key in its shard
        self.shards: list[str] = []
        self.failed: dict[str, tuple[str, str]] = {}  # key -> (path, reason)
        self._file = None
        for number, record in enumerate(records, 2):
            try:
                self._apply(record)
            except (TypeError, ValueError, KeyError, AttributeError):
                raise ValueError(f"{path}: line {number} is not a manifest record this version writes (corrupt "
                                 f"file?): use another --out, or delete {path.name} to extract again") from None

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
            if header.get("version", 1) < VERSION:
                raise ValueError(f"{path} was written by an older cleandift-rt that did not record what its features "
                                 "were made from (content digests), so they cannot be checked: use another --out, or "
                                 f"delete {path.name} to extract everything into {path.parent} again")
            _check_same_run(path, header.get("config", {}), wanted)
            records = records[1:]
        else:
            header = {"manifest": KIND, "version": VERSION, "config": wanted}
            atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(_line(header)))
        return cls(path, header["config"], records)

    def _apply(self, record: dict) -> None:
        for key in record.get("redo", []):
            self.done.pop(key, None)
            self.rows.pop(key, None)
            self.inputs.pop(key, None)
        for name in record.get("drop", []):
            self.shards = [s for s in self.shards if s != name]
            self.digests.pop(name, None)
        for entry in record.get("files", []):
            key, output, *digests = entry
            if self._mark_done(key, output):
                self.inputs[key] = digests[0] if digests else None
                self.digests[output] = digests[1] if len(digests) > 1 else None
        if "shard" in record:
            name = record["shard"]
            self.shards.append(name)
            self.digests[name] = record.get("digest")
            inputs = record.get("inputs") or [None] * len(record.get("images", []))
            for row, (key, digest) in enumerate(zip(record.get("images", []), inputs)):
                if self._mark_done(key, name):
                    self.rows[key] = row
                    self.inputs[key] = digest
        for key, path, reason in record.get("failed", []):
            if key not in self.done:
                self.failed[key] = (path, reason)

    def _mark_done(self, key: str, output: str) -> bool:
        self.failed.pop(key, None)
        if key in self.done:  # the first record that lists an image (since its last redo) owns it
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
        """``files``: ``(key, output, input digest, output digest)`` per image written."""
        self.append({"files": [list(f) for f in files], "failed": [list(f) for f in failed]})

    def record_shard(self, record: dict, failed=()) -> None:
        """``record``: ``shards.shard_record`` of a shard written."""
        self.append({**record, "failed": [list(f) for f in failed]})

    def record_failed(self, failed) -> None:
        if failed:
            self.append({"failed": [list(f) for f in failed]})

    def record_redo(self, keys, drop=()) -> None:
        """Forget ``keys`` (and the shards in ``drop``): their outputs are to be written again."""
        if keys or drop:
            self.append({"redo": sorted(keys), "drop": sorted(drop)})

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
