"""Tracking videos with exact ground truth, made from any photo folder by a known smooth camera motion.

The photo becomes a canvas (shorter side twice the frame size); each frame is the canvas seen
through a homography that moves smoothly (smoothstep in time) from the centred view:

- ``translation``: the view slides by half a frame right and a fifth down;
- ``rotation``: it turns by 40 degrees about the frame centre;
- ``scale``: it zooms in 2x;
- ``perspective``: it tilts about the vertical axis while drifting sideways.

Query points are trackable points of the first frame (corners, topped up from a grid); a point's position in frame t is its canvas
point seen through frame t's homography, and it is occluded exactly when that lies outside the
frame. Every motion takes some points out of the frame, so visibility is tested too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..features.preprocess import load_image
from .metrics import EVAL_SIZE, TrackingVideo
from .video import cv2_module

MOTIONS = ("translation", "rotation", "scale", "perspective")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _motion(motion: str, s: float, size: int) -> np.ndarray:
    """The camera motion at progress ``s`` in [0, 1], in frame pixels centred on the frame centre."""
    if motion == "translation":
        return np.array([[1, 0, 0.5 * size * s], [0, 1, 0.2 * size * s], [0, 0, 1]])
    if motion == "rotation":
        a = np.deg2rad(40.0 * s)
        return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    if motion == "scale":
        z = 1.0 / (1.0 + s)
        return np.array([[z, 0, 0], [0, z, 0], [0, 0, 1]])
    if motion == "perspective":
        return np.array([[1, 0, 0.25 * size * s], [0, 1, 0], [0.8 / size * s, 0, 1]])
    raise ValueError(f"unknown motion {motion!r}: use one of {', '.join(MOTIONS)}")


def view_homographies(motion: str, frames: int, size: int, canvas_hw: tuple[int, int]) -> np.ndarray:
    """``[T, 3, 3]``: frame pixel -> canvas pixel for each frame (the view at t = 0 is the canvas centre)."""
    if frames < 2:
        raise ValueError(f"a tracking video needs at least 2 frames, got {frames}")
    centre_frame = (size - 1) / 2
    to_centre = np.array([[1, 0, -centre_frame], [0, 1, -centre_frame], [0, 0, 1]])
    from_centre = np.array([[1, 0, (canvas_hw[1] - 1) / 2], [0, 1, (canvas_hw[0] - 1) / 2], [0, 0, 1]])
    out = []
    for t in range(frames):
        u = t / (frames - 1)
        s = u * u * (3 - 2 * u)  # smoothstep: starts and stops gently
        out.append(from_centre @ _motion(motion, s, size) @ to_centre)
    return np.stack(out)


def _apply(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ h.T
    return p[:, :2] / p[:, 2:3]


def query_points(frame: np.ndarray, count: int, rng: np.random.Generator, margin: int = 8) -> np.ndarray:
    """``count`` trackable points of the first frame: Shi-Tomasi corners (OpenCV's goodFeaturesToTrack,
    spread out), topped up with jittered grid points where the photo has too few corners."""
    cv2 = cv2_module()
    size = frame.shape[0]
    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    mask = np.zeros_like(grey)
    mask[margin:size - margin, margin:size - margin] = 255
    corners = cv2.goodFeaturesToTrack(grey, maxCorners=count, qualityLevel=0.01, minDistance=max(4, size // 32),
                                      mask=mask)
    found = np.zeros((0, 2)) if corners is None else corners.reshape(-1, 2).astype(np.float64)
    if len(found) >= count:
        return found[:count]
    side = int(np.ceil(np.sqrt(count)))
    step = (size - 2 * margin) / side
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1) * step + margin + step / 2
    grid = grid + rng.uniform(-step / 4, step / 4, size=grid.shape)
    return np.concatenate([found, rng.permutation(grid)[: count - len(found)]])


def synthetic_video(photo, motion: str, *, frames: int = 24, points: int = 64, size: int = EVAL_SIZE,
                    seed: int = 0, name: str = "photo") -> TrackingVideo:
    """One video of ``photo`` (PIL or uint8 H x W x 3) under ``motion``."""
    cv2 = cv2_module()
    image = np.asarray(photo.convert("RGB") if hasattr(photo, "convert") else photo)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: photos must be RGB uint8 H x W x 3, got {image.dtype} {image.shape}")
    zoom = 2 * size / min(image.shape[:2])
    canvas = cv2.resize(image, (max(1, round(image.shape[1] * zoom)), max(1, round(image.shape[0] * zoom))),
                        interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_CUBIC)
    views = view_homographies(motion, frames, size, canvas.shape[:2])
    video = np.stack([cv2.warpPerspective(canvas, v, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                          borderMode=cv2.BORDER_REFLECT_101) for v in views])
    start = query_points(video[0], points, np.random.default_rng(seed))
    on_canvas = _apply(views[0], start)
    tracks = np.stack([_apply(np.linalg.inv(v), on_canvas) for v in views], axis=1)  # [N, T, 2]
    occluded = ((tracks < -0.5) | (tracks > size - 0.5)).any(-1)
    return TrackingVideo(f"{name}-{motion}", video, tracks.astype(np.float32), occluded)


def photo_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--synthetic {folder}: expected a folder of photos (.jpg, .png, ...)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no photos ({', '.join(IMAGE_SUFFIXES)})")
    return files


def synthetic_videos(folder: str | Path, motions=MOTIONS, *, frames: int = 24, points: int = 64,
                     size: int = EVAL_SIZE, seed: int = 0, max_photos: int | None = None):
    """One video per photo of ``folder`` and motion, generated lazily (one at a time in memory)."""
    for motion in motions:
        _motion(motion, 0.0, size)  # unknown motions fail before any work
    files = photo_files(folder)[:max_photos]
    for i, path in enumerate(files):
        photo = load_image(path)
        for motion in motions:
            yield synthetic_video(photo, motion, frames=frames, points=points, size=size, seed=seed + i,
                                  name=path.stem)


__all__ = ["MOTIONS", "synthetic_video", "synthetic_videos", "view_homographies", "query_points", "photo_files"]
