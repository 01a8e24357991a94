"""The local pipelined extractor: decoding and resizing in a thread pool, batches through one
Engine, writing in a thread of its own, so the three overlap; the manifest commits each batch
(per-image formats) or shard, so a killed run resumes where it stopped."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from ..checks import check_size
from . import files, shards
from .inputs import DECODE_ERRORS, Item, RunConfig, decode_input, run_config
from .manifest import Manifest
from .resume import Summary, open_run

CPU_BATCH = 4  # CPU backends gain little past 4 images per call and hold more memory


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_batch_size(engine) -> int:
    """The batch a plan's profile was built for (its optimum); 4 elsewhere, within the engine's limit."""
    if engine.backend.name == "tensorrt":
        best = int(engine.backend.info.batch.get("opt") or 1)
    else:
        best = CPU_BATCH
    return max(1, min(best, engine.max_batch or best))


def engine_config(engine, fmt: str) -> RunConfig:
    """The run's facts from an open Engine; the shape of a tap the file's tap table does not describe
    (``"hyper"`` of an aggregator) is read off one blank image run through the engine."""
    info, (h, w) = engine.backend.info, engine.size
    shapes = {t: info.tap_shape(t, h, w) for t in engine.taps if t in info.tap_names}
    others = [t for t in engine.taps if t not in shapes]
    if others:
        probe = engine.extract(torch.zeros(1, 3, h, w), taps=others)
        shapes.update({t: tuple(probe[t].shape[1:]) for t in others})
    described = engine.info
    derived_files = [described[d["given"]]["path"] for d in described.get("derived", [])
                     if d.get("given") not in (None, "derived") and "path" in described.get(d["given"], {})]
    return run_config(fmt, {t: shapes[t] for t in engine.taps}, engine.size, engine.resize,
                      engine.requested_precision, engine.path, base=getattr(engine.backend, "base_source", None),
                      prompt=info.prompt, derived_files=derived_files)


@contextmanager
def single_threaded_torch(engine):
    """One PyTorch thread while the engine is not PyTorch: preparing one small image in a decoding
    thread is a few tiny tensor ops, and PyTorch's thread pool, contending with the engine's
    threads, made them ~25x slower (0.05 ms alone, 1.6-24 ms with two threads on a busy CPU)."""
    if engine.backend.name == "pytorch":  # its threads run the model
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class _Writer(threading.Thread):
    """Writes batches handed over by the inference loop and commits them in the manifest."""

    def __init__(self, out, manifest: Manifest, config: RunConfig, shard_images: int, bar, summary: Summary):
        super().__init__(name="cleandift-rt-writer", daemon=True)
        self.out, self.manifest, self.config, self.bar, self.summary = out, manifest, config, bar, summary
        self.shard_images = shard_images
        self.jobs: queue.Queue = queue.Queue(maxsize=2)  # bounds the features held in memory
        self.rows: list[dict] = []  # shards: rows waiting for a full shard
        self.failed: list = []  # shards: failures committed with the next shard
        self.error: BaseException | None = None

    def put(self, job) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                self._write(*job)
            self._flush(final=True)
        except BaseException as exc:  # raised in the inference loop; a full disk as one line
            self.error = files.write_failure(exc, self.out, self.summary.done) or exc

    def _write(self, rows: list[dict], failed: list) -> None:
        handled = len(rows) + len(failed)
        if self.config.format == "shards":
            self.rows.extend(rows)
            self.failed.extend(failed)
            self._flush(final=False)
        else:
            written, failed = [], list(failed)
            for r in rows:
                try:
                    name, digest = files.write_image_features(self.out, r["item"], r["features"], r["size"],
                                                              self.config, r["digest"])
                except OSError as exc:  # one image's problem: listed as failed, the others go on
                    if not files.name_too_long(exc):
                        raise
                    size = len(files.output_name(r["key"], self.config.format).encode())
                    failed.append((r["key"], r["path"], f"its output name ({size} bytes with the suffix) is too long "
                                   "for the file system: rename the image, or use --format shards"))
                    continue
                written.append((r["key"], name, r["digest"], digest))
            self.manifest.record_files(written, failed)
            self.summary.done += len(written)
        self.summary.failed.extend((path, why) for _, path, why in failed)
        self.bar.update(handled)

    def _flush(self, final: bool) -> None:
        while self.rows and (len(self.rows) >= self.shard_images or final):
            part, self.rows = self.rows[: self.shard_images], self.rows[self.shard_images:]
            name = shards.write_shard(self.out, part, self.config)
            self.manifest.record_shard(shards.shard_record(self.out, name, part), self.failed)
            self.failed = []
            self.summary.done += len(part)
        if final and self.failed:
            self.manifest.record_failed(self.failed)
            self.failed = []

    def finish(self) -> None:
        """Write what was handed over (the last shard too), then stop; raises the writer's error."""
        if self.is_alive():
            while self.is_alive():
                try:
                    self.jobs.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.join()
        if self.error is not None:
            raise self.error


def extract_local(engine, items: list[Item], out, *, fmt: str = "safetensors", batch_size: int | None = None,
                  shard_images: int | None = None, workers: int | None = None, progress: bool = True,
                  log=print) -> Summary:
    """Extract ``items`` with ``engine`` into ``out`` (resuming what a previous run left), overlapping
    decoding (``workers`` threads), inference (``batch_size`` images per call) and writing."""
    from tqdm.auto import tqdm

    batch_size = default_batch_size(engine) if batch_size is None else check_size(batch_size, "batch_size")
    workers = min(4, usable_cpus()) if workers is None else check_size(workers, "workers")
    config = engine_config(engine, fmt)
    shard_images = shards.default_shard_images(config) if shard_images is None else check_size(shard_images,
                                                                                                "shard_images")
    with open_run(out, items, config, log) as run:
        summary = run.summary
        log(f"{summary.images} image(s): {summary.skipped} already extracted"
            + (f" ({summary.found} found on disk)" if summary.found else "")
            + (f", {len(summary.redone)} to extract again" if summary.redone else "")
            + f", {len(run.todo)} to do; taps {', '.join(config.taps)}; engine input {config.input_size[0]}x"
            f"{config.input_size[1]} ({config.resize}); batch {batch_size}")
        t0 = time.perf_counter()
        with tqdm(total=len(run.todo), desc="extract", unit="img", disable=not progress) as bar:
            writer = _Writer(run.out, run.manifest, config, shard_images, bar, summary)
            writer.start()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="cleandift-rt-decode")
            try:
                with single_threaded_torch(engine):
                    _infer(engine, run.todo, config, batch_size, workers, pool, writer)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                writer.finish()
        summary.seconds = time.perf_counter() - t0
    return summary


def _infer(engine, todo: list[Item], config: RunConfig, batch_size: int, workers: int, pool, writer) -> None:
    """Batches of decoded images, in input order, through the engine; decoding runs ahead."""
    window = max(2 * batch_size, 2 * workers)
    pending: deque = deque()
    upcoming = iter(todo)

    def refill():
        while len(pending) < window and (item := next(upcoming, None)) is not None:
            pending.append((item, pool.submit(decode_input, item.path, config.input_size, config.resize)))

    refill()
    while pending:
        ready, failed = [], []
        while pending and len(ready) < batch_size:
            item, future = pending.popleft()
            refill()
            try:
                pixels, size, digest = future.result()
            except DECODE_ERRORS as exc:
                failed.append((item.key, item.path, first_line(exc)))
                continue
            ready.append((item, pixels, size, digest))
        rows = []
        if ready:
            feats = engine.extract(torch.from_numpy(np.stack([r[1] for r in ready])), taps=list(config.taps))
            arrays = {t: f.float().numpy() for t, f in feats.items()}  # stored as float32 (fp16 / bf16 engines too)
            rows = [{"key": item.key, "path": item.path, "item": item, "size": size, "digest": digest,
                     "features": {t: a[j] for t, a in arrays.items()}}
                    for j, (item, _, size, digest) in enumerate(ready)]
        writer.put((rows, failed))
