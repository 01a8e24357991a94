"""TAP-Vid files (DAVIS, Kinetics, RGB-Stacking) as ``TrackingVideo``s at 256 x 256.

The files are Python pickles: ``{video_name: {"video": uint8 [T, H, W, 3], "points": float [N, T, 2]
as (x, y) in [0, 1], "occluded": bool [N, T]}}`` (DAVIS), or a list of such records (RGB-Stacking,
the Kinetics shards, whose "video" is a list of JPEG-encoded frames). A pickle can run code when it
is read, so they are read only when the caller says ``allow_pickle=True`` (``--allow-pickle``).

Frames are resized to 256 x 256 (TAP-Vid's evaluation size) and points go to pixels of that size
with centres at integers: ``x_px = x * 256 - 0.5`` (the metrics only see differences, so this
equals TAP-Vid's own raster convention ``x * 256``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator

import numpy as np

from .metrics import EVAL_SIZE, TrackingVideo
from .video import cv2_module

PICKLE_SUFFIXES = (".pkl", ".pickle")


def tapvid_files(path: str | Path) -> list[Path]:
    """The pickle itself, or every ``*.pkl`` / ``*.pickle`` in a folder (the Kinetics shards), sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no TAP-Vid pickles (*.pkl): pass the file, e.g. tapvid_davis.pkl")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"TAP-Vid file {path} does not exist")
    return [path]


def load_tapvid(path: str | Path, *, allow_pickle: bool = False, size: int = EVAL_SIZE) -> Iterator[TrackingVideo]:
    """Every video of a TAP-Vid pickle (or folder of them), resized to ``size`` x ``size``."""
    files = tapvid_files(path)
    if not allow_pickle:
        raise ValueError(f"{files[0]} is a pickle, and reading a pickle can run code: pass allow_pickle=True "
                         "(--allow-pickle) only for files from a source you trust (TAP-Vid's own downloads)")
    return _read(files, size)


def _read(files: list[Path], size: int) -> Iterator[TrackingVideo]:
    for file in files:
        with open(file, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - the caller said allow_pickle=True
        if isinstance(data, dict) and "video" not in data:
            records = list(data.items())
        elif isinstance(data, (list, tuple)):
            records = [(f"{file.stem}-{i:04d}", r) for i, r in enumerate(data)]
        else:
            raise ValueError(f"{file}: expected a dict {{video_name: record}} or a list of records, got "
                             f"{type(data).__name__}")
        for name, record in records:
            yield _video(str(name), record, size, file)


def _video(name: str, record, size: int, file: Path) -> TrackingVideo:
    if not isinstance(record, dict) or not {"video", "points", "occluded"} <= set(record):
        raise ValueError(f"{file}: video {name} must have 'video', 'points' and 'occluded'")
    frames = _frames(record["video"], name, file)
    points = np.asarray(record["points"], dtype=np.float64)
    occluded = np.asarray(record["occluded"], dtype=bool)
    if points.ndim != 3 or points.shape[1:] != (len(frames), 2) or occluded.shape != points.shape[:2]:
        raise ValueError(f"{file}: video {name} has {len(frames)} frames but points {points.shape} / occluded "
                         f"{occluded.shape} (expected [N, T, 2] / [N, T])")
    cv2 = cv2_module()
    resized = np.stack([f if f.shape[:2] == (size, size) else
                        cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA if f.shape[0] > size else cv2.INTER_LINEAR)
                        for f in frames])
    return TrackingVideo(name, resized, (points * size - 0.5).astype(np.float32), occluded)


def _frames(video, name: str, file: Path) -> np.ndarray:
    """uint8 [T, H, W, 3] from an array or from a list of encoded (JPEG/PNG) frames."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{file}: video {name} must be uint8 [T, H, W, 3], got {video.shape}")
        return video
    if isinstance(video, (list, tuple)) and video and all(isinstance(b, (bytes, bytearray)) for b in video):
        cv2 = cv2_module()
        frames = []
        for i, data in enumerate(video):
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{file}: video {name}, frame {i} is not a decodable image")
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        return np.stack(frames)
    raise ValueError(f"{file}: video {name} must be uint8 [T, H, W, 3] or a list of encoded frames, got "
                     f"{type(video).__name__}")


__all__ = ["load_tapvid", "tapvid_files"]
