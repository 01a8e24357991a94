"""The explorer's tracking tab: points clicked on the first frame of a sequence, followed through it by a
``cleandift_rt.Tracker`` (passed in as a factory, one tracker per tap), played back on the page.

The frames' descriptor maps are computed once per tap (a few frames per engine call) and kept, so
tracking other points again runs only the matching.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
from PIL import Image

from .session import ExploreError

MAX_FRAMES = 150  # descriptor maps of every frame stay in memory
MAX_POINTS = 16
FRAME_SIDE = 768  # long side frames are kept at (and tracked in)
EXTRACT_BATCH = 8


def shrink(frame: np.ndarray, side: int = FRAME_SIDE) -> np.ndarray:
    """An RGB uint8 frame with its long side at most ``side``."""
    h, w = frame.shape[:2]
    if max(h, w) <= side:
        return frame
    image = Image.fromarray(frame)
    image.thumbnail((side, side), Image.BICUBIC)
    return np.asarray(image)


class TrackingSession:
    """A frame sequence and the trackers that follow points through it.

    Args:
        frames: RGB uint8 ``H x W x 3`` frames (already at most ``FRAME_SIDE``; the first is the reference).
        fps: playback rate.
        name: what the page calls the sequence.
        make_tracker: ``tap -> Tracker`` (``cleandift_rt.Tracker(engine, tap=tap)``).
        lock: the explorer session's lock (both drive one engine).
        total: frames in the source (None: unknown); the page says when only the first were kept.
    """

    def __init__(self, frames, fps: float, name: str, make_tracker, lock, total: int | None = None):
        if not frames:
            raise ExploreError(f"{name} holds no frames")
        self.frames, self.fps, self.name = list(frames), float(fps), name
        self.make_tracker, self.lock, self.total = make_tracker, lock, total
        self._features: tuple[str, object, list] | None = None  # (tap, tracker, FrameFeatures): one tap at a time
        self._jpegs: dict[int, bytes] = {}

    def describe(self) -> dict:
        h, w = self.frames[0].shape[:2]
        return {"name": self.name, "frames": len(self.frames), "fps": self.fps, "width": w, "height": h,
                "total": self.total}

    def frame(self, index: int) -> bytes:
        if not 0 <= index < len(self.frames):
            raise ExploreError(f"no frame {index}: the sequence has {len(self.frames)}")
        if index not in self._jpegs:
            buffer = io.BytesIO()
            Image.fromarray(self.frames[index]).save(buffer, format="JPEG", quality=85)
            self._jpegs[index] = buffer.getvalue()
        return self._jpegs[index]

    def _tracker(self, tap: str):
        """The tracker on ``tap`` and every frame's maps (computed at its first use)."""
        if self._features is None or self._features[0] != tap:
            self._features = None  # the previous tap's maps go before the new ones are made
            tracker = self.make_tracker(tap)
            maps = []
            for i in range(0, len(self.frames), EXTRACT_BATCH):
                maps += tracker.features(self.frames[i:i + EXTRACT_BATCH])
            self._features = (tap, tracker, maps)
        return self._features[1], self._features[2]

    def _points(self, points) -> np.ndarray:
        h, w = self.frames[0].shape[:2]
        if not isinstance(points, list) or not 1 <= len(points) <= MAX_POINTS:
            raise ExploreError(f"click 1 to {MAX_POINTS} points on the first frame, then track")
        for p in points:
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                and math.isfinite(v) for v in p)):
                raise ExploreError(f"point {p!r} is not a pair of numbers")
            if not (-0.5 <= p[0] <= w - 0.5 and -0.5 <= p[1] <= h - 0.5):
                raise ExploreError(f"point ({p[0]:.1f}, {p[1]:.1f}) lies outside the first frame ({w} x {h} pixels)")
        return np.asarray(points, dtype=np.float32)

    def track(self, args: dict) -> dict:
        """``{"points": [[x, y], ...], "recipe": {"kind": "tap", "tap": T}}`` -> every frame's points,
        visibility and scores (frame 0: the points themselves)."""
        points = self._points(args.get("points"))
        recipe = args.get("recipe") or {}
        if recipe.get("kind") != "tap":
            raise ExploreError("the tracker follows an engine output as it is: pick 'raw tap' (or hyper) as the recipe")
        with self.lock:
            t0 = time.perf_counter()
            tracker, maps = self._tracker(recipe.get("tap"))
            extract = time.perf_counter() - t0
            t1 = time.perf_counter()
            tracker.set_reference(maps[0], points)
            tracks = [tracker.track(m) for m in maps[1:]]
            matching = time.perf_counter() - t1
        return {"frames": len(maps), "tap": recipe.get("tap"),
                "points": [points.tolist()] + [r.points.tolist() for r in tracks],
                "visible": [[True] * len(points)] + [r.visible.tolist() for r in tracks],
                "score": [[1.0] * len(points)] + [r.score.tolist() for r in tracks],
                "extract_s": round(extract, 3), "ms_per_frame": round(matching * 1e3 / len(maps), 2)}
