"""The three stages of the Ray pipeline as plain functions of Ray Data batches (dicts of numpy
arrays), so they run, and are tested, without Ray: decode (CPU tasks), the Engine (one per
actor), write a shard (CPU tasks).

Every row carries ``status``: ``ok`` (decoded), ``failed`` (unreadable; ``error`` says why) or
``mark`` (no image: it only carries ``skipped``, the count of rows a decode batch dropped as done
by an earlier run). Non-``ok`` rows travel with zero pixels and features; they are few.
"""

from __future__ import annotations

import json

import numpy as np

from ..extraction.inputs import DECODE_ERRORS, RunConfig, decode_input
from ..extraction.shards import shard_record, write_shard

FEATURE = "feature:"  # column prefix of a tap's features
PASS_THROUGH = ("key", "path", "status", "error", "width", "height", "skipped", "digest")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def decode_batch(batch: dict, *, size, resize: str, done=None) -> dict:
    """``{"path"[, "key"]}`` rows -> model input ``pixels`` (``N x 3 x H x W``) and what the other
    stages need; rows whose key is in ``done`` are dropped and counted."""
    paths = [str(p) for p in batch["path"]]
    keys = [str(k) for k in batch["key"]] if "key" in batch else paths
    rows, skipped = [], 0
    for key, path in zip(keys, paths):
        if done is not None and key in done:
            skipped += 1
            continue
        try:
            pixels, (width, height), digest = decode_input(path, size, resize)
            rows.append((key, path, "ok", "", width, height, pixels, digest))
        except DECODE_ERRORS as exc:
            rows.append((key, path, "failed", _first_line(exc), 0, 0, None, ""))
    if not rows and skipped:
        rows.append(("", "", "mark", "", 0, 0, None, ""))
    blank = np.zeros((3, *size), np.float32)
    out = {name: np.array([r[i] for r in rows], dtype=object if i < 4 else np.int64)
           for i, name in enumerate(("key", "path", "status", "error", "width", "height"))}
    out["digest"] = np.array([r[7] for r in rows], dtype=object)
    out["skipped"] = np.array([skipped if i == 0 else 0 for i in range(len(rows))], np.int64)
    out["pixels"] = np.stack([blank if r[6] is None else r[6] for r in rows]) if rows else np.zeros((0, 3, *size),
                                                                                                 np.float32)
    return out


class EngineWorker:
    """Holds one Engine for the actor's life and runs the decoded rows of each batch through it."""

    def __init__(self, engine_path: str, taps, options: dict):
        from ..runtime.engine import Engine

        self.engine = Engine(engine_path, taps=list(taps), **options)
        self.taps = tuple(taps)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.asarray(batch["status"]) == "ok"
        out = {name: batch[name] for name in PASS_THROUGH}
        feats = {}
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            feats = self.engine.extract(pixels, taps=list(self.taps))
        for tap in self.taps:
            if ok.all():
                out[FEATURE + tap] = _numpy(feats[tap])
                continue
            shape = self.engine.backend.info.tap_shape(tap, *self.engine.size)
            column = np.zeros((len(ok), *shape), np.float32)
            if ok.any():
                column[ok] = _numpy(feats[tap])
            out[FEATURE + tap] = column
        return out


def _numpy(t):
    return t.float().numpy()  # float32 whatever the engine computes in, as the local extractor stores


def write_batch(batch: dict, *, out: str, config: RunConfig) -> dict:
    """Write the ``ok`` rows as one shard; one summary row: the manifest record (JSON), images
    written, skipped as done."""
    status = np.asarray(batch["status"])
    rows = [{"key": str(batch["key"][i]), "path": str(batch["path"][i]), "digest": str(batch["digest"][i]),
             "size": (int(batch["width"][i]), int(batch["height"][i])),
             "features": {t: batch[FEATURE + t][i] for t in config.taps}} for i in np.flatnonzero(status == "ok")]
    failed = [[str(batch["key"][i]), str(batch["path"][i]), str(batch["error"][i])]
              for i in np.flatnonzero(status == "failed")]
    record = {}
    if rows:
        record = shard_record(out, write_shard(out, rows, config), rows)
    if failed:
        record["failed"] = failed
    return {"record": np.array([json.dumps(record)], dtype=object), "images": np.array([len(rows)], np.int64),
            "skipped": np.array([int(np.sum(batch["skipped"]))], np.int64)}
