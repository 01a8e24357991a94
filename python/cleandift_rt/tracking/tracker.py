"""``Tracker``: follow points from a reference image through camera frames by dense-descriptor matching.

Zero-shot tracking-by-matching: the reference image's feature map is sampled (bilinearly) at the
query points once; every frame's map is then searched for each query vector by the native
``match`` kernel (cosine argmax without an N x M matrix) and the window soft-argmax refinement
(``kernels.refine``). Visibility is a forward-backward check: the frame's features at the found
point are matched back into the reference, and the point is visible when that lands within
``radius`` pixels of where it started, its cosine is at least ``min_score`` and it is inside the frame.

Coordinates are ``(x, y)`` pixels of the image they refer to (pixel centres at integers); the
engine's size policy (``stretch`` or ``pad``) is undone through ``preprocess.Geometry``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..features.preprocess import Geometry, load_image, prepare_images
from ..kernels.matching import match, sample_points
from ..kernels.refine import DEFAULT_TEMPERATURE, DEFAULT_WINDOW
from ..runtime.latest import check_policy, frames as policy_frames
from ..taps import DEFAULT_TAP

DEFAULT_MIN_SCORE = 0.5


@dataclass
class TrackResult:
    """Where the reference points are in one frame."""

    points: np.ndarray  # [N, 2] float32 (x, y) in the frame's pixels
    score: np.ndarray  # [N] float32 cosine similarity of the match
    visible: np.ndarray  # [N] bool: forward-backward consistent, score >= min_score, inside the frame


@dataclass
class TrackStreamResult:
    """One frame of ``Tracker.stream``."""

    index: int  # position of the frame in the source
    capture_time: float  # time.perf_counter() when the source yielded it
    latency: float  # seconds from capture to the tracks being ready
    dropped: int  # frames dropped since the previous result ("latest" policy)
    tracks: TrackResult | dict


@dataclass
class FrameFeatures:
    """A frame's descriptor map ``[C, h, w]`` (model input grid) and where the frame sits in that grid."""

    map: torch.Tensor
    geometry: Geometry


@dataclass
class _View:
    """A reference (or keyframe) of one camera: its map, its points (model pixels), their descriptors."""

    features: FrameFeatures
    points: torch.Tensor  # [N, 2] model pixels
    queries: torch.Tensor  # [N, C]
    valid: torch.Tensor  # [N] bool: the points this view may answer for


@dataclass
class _Camera:
    reference: _View
    keyframes: list = field(default_factory=list)
    tracked: int = 0  # frames tracked since the reference was set


def to_model(points: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Image pixels -> model-input pixels (centres at integers)."""
    scale = torch.tensor([g.scale_x, g.scale_y], dtype=torch.float32)
    return (points + 0.5) * scale - 0.5


def to_image(points: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Model-input pixels -> image pixels."""
    scale = torch.tensor([g.scale_x, g.scale_y], dtype=torch.float32)
    return (points + 0.5) / scale - 0.5


class Tracker:
    """Point tracker on an engine's dense descriptors.

    Args:
        engine: a ``cleandift_rt.Engine`` (anything with ``extract(pixels, taps=...)``, ``size`` and ``resize``).
        tap: the tap (or taps, L2-normalised each and concatenated on the finest grid) to match on;
            default ``us6`` when the engine has it, else its first tap.
        refine: window soft-argmax around the best cell (sub-cell positions); else cell centres.
        radius: forward-backward radius in the reference image's pixels; None = one cell of the
            descriptor map (16 px for us6 when the image is the engine's size).
        min_score: similarity floor of a visible point (cosine of the forward match).
        keyframe_every: every this many tracked frames the frame becomes a keyframe: its descriptors at
            the points visible there join the reference's, and each point takes the best-scoring view
            (0 = off, the reference alone). ``max_keyframes`` keeps the newest ones.
        window, temperature, precision: passed to the match kernel and the refinement.
        prompt, prompt_embeds: passed to ``engine.extract`` (text-conditioned students: the instruction).
    """

    def __init__(self, engine, tap: str | Sequence[str] | None = None, refine: bool = True, *,
                 radius: float | None = None, min_score: float = DEFAULT_MIN_SCORE, keyframe_every: int = 0,
                 max_keyframes: int = 3, window: int = DEFAULT_WINDOW, temperature: float = DEFAULT_TEMPERATURE,
                 precision: str | None = None, prompt=None, prompt_embeds=None):
        self.engine = engine
        available = tuple(engine.taps)
        if tap is None:
            tap = DEFAULT_TAP if DEFAULT_TAP in available else available[0]
        self.taps = (tap,) if isinstance(tap, str) else tuple(tap)
        missing = [t for t in self.taps if t not in available]
        if not self.taps or missing:
            raise ValueError(f"tap(s) {missing or list(self.taps)} not in the engine's taps {list(available)}: "
                             "pick taps the engine computes (or re-export it with them)")
        if radius is not None and not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a positive number of pixels (or None for one feature cell), got {radius!r}")
        if not -1.0 <= float(min_score) <= 1.0:
            raise ValueError(f"min_score is a cosine similarity floor in [-1, 1], got {min_score!r}")
        if int(keyframe_every) < 0 or int(max_keyframes) < 1:
            raise ValueError(f"keyframe_every must be >= 0 (0 = off) and max_keyframes >= 1, got {keyframe_every}, "
                             f"{max_keyframes}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        self.refine, self.radius, self.min_score = bool(refine), radius, float(min_score)
        self.keyframe_every, self.max_keyframes = int(keyframe_every), int(max_keyframes)
        self.window, self.temperature, self.precision = window, temperature, precision
        self._text = {"prompt": prompt} if prompt is not None else {"prompt_embeds": prompt_embeds} \
            if prompt_embeds is not None else {}
        self.size = tuple(engine.size)
        self.cameras: dict[Any, _Camera] = {}
        self.timing = {"extract": 0.0, "match": 0.0}  # seconds of the last call: the engine, and our own work

    # -- features --------------------------------------------------------------------------------

    def features(self, images: Sequence) -> list[FrameFeatures]:
        """Descriptor maps of images (PIL, uint8 H x W x 3, float 3 x H x W in [-1, 1], or file paths) in
        ONE engine call; ``set_reference`` and ``track`` take these too (to extract a video once)."""
        pixels, geometry = [], []
        for i, image in enumerate(images):
            if isinstance(image, (str, Path)):
                image = load_image(image)
            if isinstance(image, torch.Tensor) or (isinstance(image, np.ndarray) and image.dtype.kind == "f"):
                if image.ndim != 3:
                    raise ValueError(f"frame {i}: float frames must be 3 x H x W in [-1, 1], got shape {tuple(image.shape)}")
                prepared = prepare_images(image[None], self.size, self.engine.resize)
            else:
                prepared = prepare_images([image], self.size, self.engine.resize)
            pixels.append(prepared.pixels)
            geometry.append(prepared.geometry[0])
        t0 = time.perf_counter()
        out = self.engine.extract(torch.cat(pixels), taps=list(self.taps), **self._text)
        self.timing["extract"] = time.perf_counter() - t0
        maps = [torch.as_tensor(np.asarray(out[t]) if not isinstance(out[t], torch.Tensor) else out[t]).float().cpu()
                for t in self.taps]
        if len(maps) > 1:  # equal say for every tap: each unit length, on the finest grid
            h, w = max(m.shape[-2] for m in maps), max(m.shape[-1] for m in maps)
            maps = [F.normalize(F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                                if m.shape[-2:] != (h, w) else m, dim=1) for m in maps]
        stacked = torch.cat(maps, dim=1)
        return [FrameFeatures(stacked[i], g) for i, g in enumerate(geometry)]

    def _as_features(self, images: list) -> list[FrameFeatures]:
        if all(isinstance(x, FrameFeatures) for x in images):
            return images
        if any(isinstance(x, FrameFeatures) for x in images):
            raise TypeError("pass either images or FrameFeatures (from Tracker.features), not a mix")
        return self.features(images)

    # -- references ------------------------------------------------------------------------------

    def set_reference(self, image, points, camera=None) -> None:
        """The image and the ``[N, 2]`` (x, y) pixels of it to follow, for ``camera`` (any name; one
        reference per camera: setting it again replaces it and drops its keyframes)."""
        feats = self._as_features([image])[0]
        g = feats.geometry
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2) if not isinstance(points, torch.Tensor) \
            else points.detach().float().cpu()
        if pts.ndim != 2 or pts.shape[-1] != 2 or len(pts) == 0:
            raise ValueError(f"points must be [N, 2] (x, y) pixels with N >= 1, got shape {tuple(np.shape(points))}")
        if not torch.isfinite(pts).all():
            raise ValueError("points contain NaN or Inf")
        outside = (pts[:, 0] < -0.5) | (pts[:, 0] > g.width - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > g.height - 0.5)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise ValueError(f"point {i} ({pts[i, 0]:.1f}, {pts[i, 1]:.1f}) lies outside the {g.width} x {g.height} "
                             "reference image: points are (x, y) pixels of the image passed with them")
        self.cameras[camera] = _Camera(self._view(feats, to_model(pts, g), torch.ones(len(pts), dtype=torch.bool)))

    def _view(self, feats: FrameFeatures, model_points: torch.Tensor, valid: torch.Tensor) -> _View:
        h, w = feats.map.shape[-2:]
        cell = torch.tensor([self.size[1] / w, self.size[0] / h])
        grid = (model_points + 0.5) / cell - 0.5  # feature pixels
        queries = sample_points(feats.map[None], grid[None])[0]
        return _View(feats, model_points, queries, valid)

    def reset(self, camera=None) -> None:
        """Forget the references and keyframes (of one camera when named, else of all)."""
        if camera is None:
            self.cameras.clear()
        else:
            self.cameras.pop(camera, None)

    # -- tracking --------------------------------------------------------------------------------

    def track(self, frame):
        """``TrackResult`` for one frame, or ``{camera: TrackResult}`` for ``{camera: frame}`` (one
        engine call for all cameras). Frames: PIL, uint8 H x W x 3, float 3 x H x W, a path, or
        ``FrameFeatures``."""
        if not self.cameras:
            raise ValueError("no reference yet: call set_reference(image, points) first")
        if isinstance(frame, dict):
            unknown = [c for c in frame if c not in self.cameras]
            if unknown:
                raise ValueError(f"no reference for camera(s) {unknown}: known {list(self.cameras)}; call "
                                 "set_reference(image, points, camera=NAME) for each")
            names = list(frame)
            feats = self._as_features([frame[c] for c in names])
            t0 = time.perf_counter()
            out = {c: self._track_camera(c, f) for c, f in zip(names, feats)}
        else:
            if len(self.cameras) != 1:
                raise ValueError(f"{len(self.cameras)} cameras have references ({list(self.cameras)}): pass "
                                 "{camera: frame, ...} to say which frame is whose")
            camera = next(iter(self.cameras))
            feats = self._as_features([frame])
            t0 = time.perf_counter()
            out = self._track_camera(camera, feats[0])
        self.timing["match"] = time.perf_counter() - t0
        return out

    def _track_camera(self, camera, feats: FrameFeatures) -> TrackResult:
        cam = self.cameras[camera]
        views = [cam.reference, *cam.keyframes]
        n, count = len(cam.reference.points), len(views)
        kwargs = dict(coords="image", image_size=self.size, refine=self.refine, window=self.window,
                      temperature=self.temperature, precision=self.precision)
        dst = feats.map[None]
        queries = torch.cat([v.queries for v in views])[None]  # [1, R * N, C]: one kernel call for all views
        found, score = match(queries, dst, **kwargs)
        found, score = found.view(count, n, 2), score.view(count, n)
        valid = torch.stack([v.valid for v in views])
        best = torch.where(valid, score, torch.full_like(score, -torch.inf)).argmax(0)
        rows = torch.arange(n)
        points, score = found[best, rows], score[best, rows]
        # backward: the frame's descriptors at the found points, matched into every view at once
        maps = torch.stack([v.features.map for v in views])
        back, _ = match(feats.map[None].expand(count, -1, -1, -1), maps, points=points[None].expand(count, -1, -1),
                        **kwargs)
        back = back[best, rows]
        start = torch.stack([v.points for v in views])[best, rows]
        g_view = [v.features.geometry for v in views]
        scale = torch.tensor([[g.scale_x, g.scale_y] for g in g_view])[best]  # model px per view-image px
        error = ((back - start) / scale).norm(dim=-1)
        g = feats.geometry
        image_points = to_image(points, g)
        if self.radius is not None:
            radius = self.radius
        else:  # one cell of the map, in the reference image's pixels
            radius = max(self.size[0] / feats.map.shape[-2], self.size[1] / feats.map.shape[-1]) / \
                min(g_view[0].scale_x, g_view[0].scale_y)
        inside = (image_points[:, 0] >= -0.5) & (image_points[:, 0] <= g.width - 0.5) & \
                 (image_points[:, 1] >= -0.5) & (image_points[:, 1] <= g.height - 0.5)
        visible = (error <= radius) & (score >= self.min_score) & inside
        cam.tracked += 1
        if self.keyframe_every and cam.tracked % self.keyframe_every == 0 and visible.any():
            cam.keyframes = [*cam.keyframes, self._view(feats, points, visible)][-self.max_keyframes:]
        return TrackResult(image_points.numpy().astype(np.float32), score.numpy().astype(np.float32),
                           visible.numpy())

    def stream(self, frames: Iterable, policy: str = "latest", prefetch: int = 4) -> Iterator[TrackStreamResult]:
        """Track a live source (frames or ``{camera: frame}`` dicts). ``"latest"`` keeps only the newest
        waiting frame (bounded latency, dropped frames counted); ``"all"`` tracks every frame in order."""
        check_policy(policy)
        for frame in policy_frames(frames, policy, prefetch):
            tracks = self.track(frame.item)
            yield TrackStreamResult(frame.index, frame.capture_time, time.perf_counter() - frame.capture_time,
                                    frame.dropped, tracks)


__all__ = ["Tracker", "TrackResult", "TrackStreamResult", "FrameFeatures", "DEFAULT_MIN_SCORE"]
