"""Frames off a live source with a queueing policy: ``"all"`` (every frame, in order) or ``"latest"``.

A camera does not wait for the model. With ``"latest"`` a reader thread takes frames off the
source as fast as it yields them and keeps only the newest one waiting: when the next frame
arrives before the consumer took the waiting one, the waiting one is dropped and counted. So at
most two frames are held, the one being processed and the newest waiting one, and a frame's
latency is bounded by about two processing times however fast the source runs. Dropped frames
are never decoded. ``"all"`` hands every frame over through a bounded queue (the reader waits
when it is full, so latency grows when the source outruns the consumer).

Used by ``Engine.stream`` and ``tracking.Tracker.stream``; it knows nothing about models.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

POLICIES = ("all", "latest")


@dataclass
class Frame:
    """One frame handed to the consumer."""

    index: int  # position in the source
    capture_time: float  # time.perf_counter() when the source yielded it
    item: Any
    dropped: int  # frames dropped since the previous frame handed over (always 0 under "all")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown stream policy {policy!r}: use 'all' (every frame, in order) or 'latest' "
                         "(drop frames that wait while a newer one arrives: bounded latency for live sources)")
    return policy


class _LatestSlot:
    """The newest waiting frame (at most one), the count of frames it replaced, and the source's end."""

    def __init__(self):
        self.cond = threading.Condition()
        self.waiting: tuple[int, float, Any] | None = None
        self.dropped = 0
        self.end: object | None = None  # _DONE or the source's exception

    def offer(self, entry) -> None:
        with self.cond:
            if self.waiting is not None:
                self.dropped += 1
            self.waiting = entry
            self.cond.notify()

    def finish(self, end) -> None:
        with self.cond:
            self.end = end
            self.cond.notify()

    def take(self) -> Frame | object:
        """The waiting frame (with the drops before it), or the end once nothing waits."""
        with self.cond:
            while self.waiting is None and self.end is None:
                self.cond.wait()
            if self.waiting is None:
                return self.end
            (index, t0, item), dropped = self.waiting, self.dropped
            self.waiting, self.dropped = None, 0
            return Frame(index, t0, item, dropped)


_DONE = object()


def frames(items: Iterable, policy: str = "latest", prefetch: int = 4) -> Iterator[Frame]:
    """``Frame``s of ``items`` under ``policy``; ``prefetch`` bounds the ``"all"`` queue.

    The source is read on a daemon thread; an exception it raises is raised here after the frames
    before it. Closing the iterator stops the reader when the source next yields (it is never
    waited for: a camera may block).
    """
    check_policy(policy)
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    stop = threading.Event()
    if policy == "latest":
        slot = _LatestSlot()

        def read():
            try:
                for index, item in enumerate(items):
                    if stop.is_set():
                        return
                    slot.offer((index, time.perf_counter(), item))
                slot.finish(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                slot.finish(exc)

        take = slot.take
    else:
        ready: queue.Queue = queue.Queue(maxsize=prefetch)

        def put(entry) -> bool:
            while not stop.is_set():
                try:
                    ready.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read():
            try:
                for index, item in enumerate(items):
                    if stop.is_set() or not put(Frame(index, time.perf_counter(), item, 0)):
                        return
                put(_DONE)
            except BaseException as exc:
                put(exc)

        take = ready.get
    reader = threading.Thread(target=read, name=f"cleandift-rt-frames-{policy}", daemon=True)
    reader.start()
    try:
        while True:
            got = take()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()


__all__ = ["Frame", "POLICIES", "check_policy", "frames"]
