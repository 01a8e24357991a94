"""The "latest" frame policy: bounded latency and memory when the source outruns the consumer (runtime.latest,
Engine.stream, Tracker.stream)."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

from cleandift_rt.runtime.latest import frames
from cleandift_rt.tracking import Tracker
from informative import InformativeEngine, texture_photo

pytestmark = pytest.mark.usefixtures("one_thread")


class Frame:
    """A frame object whose lifetime the test can watch."""

    def __init__(self, index):
        self.index = index


def timed_source(count: int, period: float, made: list):
    """``count`` frames at one per ``period`` seconds (a camera), each also recorded weakly in ``made``."""
    start = time.perf_counter()
    for i in range(count):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        frame = Frame(i)
        made.append(weakref.ref(frame))
        yield frame


def test_latest_holds_at_most_two_frames_and_counts_every_drop():
    made, results, steps = [], [], []
    for frame in frames(timed_source(120, 0.002, made), "latest"):
        start = time.perf_counter()
        gc.collect()
        alive = [r() for r in made if r() is not None]
        # the frame in flight, the newest waiting one, and the one the reader has just taken off the source
        assert len(alive) <= 3, [f.index for f in alive]
        del alive
        time.sleep(0.02)
        results.append((frame.index, frame.dropped, start - frame.capture_time))
        steps.append(time.perf_counter() - start)
    indices = [i for i, _, _ in results]
    assert indices == sorted(indices) and indices[-1] == 119  # the newest frame is never dropped
    assert sum(d for _, d, _ in results) + len(results) == 120 and len(results) < 60
    assert all(d == i - prev - 1 for (i, d, _), prev in zip(results, [-1] + indices[:-1]))
    # a frame waits at most while the one before it is worked on: bounded by the work, not the backlog
    assert max(wait for _, _, wait in results) < max(steps) + 0.05


def test_all_keeps_every_frame_in_order():
    made = []
    got = [(f.index, f.dropped) for f in frames(timed_source(20, 0.0, made), "all", prefetch=2)]
    assert got == [(i, 0) for i in range(20)]
    with pytest.raises(ValueError, match="unknown stream policy"):
        next(frames([], "newest"))


def test_source_errors_arrive_after_the_frames_before_them():
    def broken():
        yield 1
        raise OSError("camera unplugged")

    seen = []
    with pytest.raises(OSError, match="unplugged"):
        for f in frames(broken(), "latest"):
            time.sleep(0.01)
            seen.append(f.item)
    assert seen == [1]


def test_engine_stream_latest(robot_engine, batch):
    engine = robot_engine
    items = [batch[i % len(batch)] for i in range(12)]
    results = list(engine.stream(iter(items), taps="us6", policy="latest"))
    indices = [r.index for r in results]
    assert indices == sorted(indices) and indices[-1] == 11
    assert sum(r.dropped for r in results) + len(results) == 12
    assert all(r.latency >= r.inference > 0 and r.capture_time > 0 for r in results)
    last = results[-1]
    np.testing.assert_allclose(last.features["us6"], engine.extract([items[11]], taps="us6")["us6"], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="batch_size=1"):
        next(engine.stream(iter(items), policy="latest", batch_size=2))
    all_results = list(engine.stream(iter(items[:3]), taps="us6"))
    assert [r.dropped for r in all_results] == [0, 0, 0] and all(r.capture_time > 0 for r in all_results)


def test_tracker_stream_latest_stays_bounded():
    """A 100 fps camera and a 20 Hz engine: latency stays about one frame's work, frames are dropped, not queued."""
    image = texture_photo(4, size=256)
    shifted = [np.ascontiguousarray(np.roll(image, s, axis=1)) for s in range(40)]
    engine = InformativeEngine(delay=0.05)
    tracker = Tracker(engine, radius=4.0, min_score=0.5)
    tracker.set_reference(image, [[100.0, 100.0], [150.0, 60.0]])
    results = list(tracker.stream(timed_source_of(shifted, 0.01), policy="latest"))
    assert sum(r.dropped for r in results) + len(results) == 40 and sum(r.dropped for r in results) > 0
    step = max(r.latency for r in results)
    assert step < 3 * (0.05 + tracker.timing["match"]) + 0.2
    last = results[-1]
    assert last.index == 39
    np.testing.assert_allclose(last.tracks.points, [[139.0, 100.0], [189.0, 60.0]], atol=1.5)


def timed_source_of(items, period):
    start = time.perf_counter()
    for i, item in enumerate(items):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield item
