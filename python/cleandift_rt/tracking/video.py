"""Video in and out with OpenCV, and the pictures of tracks: frames with points and trails, and the
metric chart of an evaluation (Pillow, like ``viz``).

Frames are RGB uint8 ``H x W x 3`` everywhere in the package; OpenCV's BGR stays inside this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .metrics import HEADLINE

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VISIBLE, HIDDEN = (40, 220, 60), (230, 50, 50)  # RGB: green where visible, red where not
DEFAULT_FPS = 30.0


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise ImportError("tracking videos (reading, writing, synthetic ones) need OpenCV: pip install "
                          "opencv-python-headless") from None
    return cv2


def open_frames(source: str | Path) -> tuple[Iterator[np.ndarray], float, int | None]:
    """(RGB frames, frames per second, frame count or None) of a video file or a folder of images
    (sorted by name; 30 fps assumed)."""
    cv2 = cv2_module()
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"{source} holds no frames ({', '.join(FRAME_SUFFIXES)})")

        def read_files():
            for p in files:
                bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if bgr is None:
                    raise ValueError(f"cannot decode frame {p}")
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

        return read_files(), DEFAULT_FPS, len(files)
    if not source.is_file():
        raise FileNotFoundError(f"video {source} does not exist (pass a video file or a folder of frames)")
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open {source} as a video (unknown codec or not a video): convert it, or "
                         "pass a folder of frames")
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None

    def read_video():
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return read_video(), float(fps), count


class VideoWriter:
    """An ``.mp4`` (mp4v) or ``.avi`` (MJPG) file of RGB frames, opened at the first frame's size."""

    CODECS = {".mp4": "mp4v", ".avi": "MJPG"}

    def __init__(self, path: str | Path, fps: float):
        self.path, self.fps, self._writer = Path(path), float(fps), None
        if self.path.suffix.lower() not in self.CODECS:
            raise ValueError(f"--out {self.path}: write the tracks video as .mp4 (or .avi)")

    def write(self, frame: np.ndarray) -> None:
        cv2 = cv2_module()
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*self.CODECS[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (frame.shape[1], frame.shape[0]))
            if not self._writer.isOpened():
                raise OSError(f"OpenCV cannot write {self.path} (no encoder for {self.path.suffix})")
        self._writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def draw_tracks(frame: np.ndarray, history: list[np.ndarray], visible: np.ndarray, trail: int = 12) -> np.ndarray:
    """The frame with each point's last ``trail`` positions as a line and its current position as a dot
    (filled green where visible, a red ring where not)."""
    cv2 = cv2_module()
    out = np.ascontiguousarray(frame.copy())
    radius = max(3, round(min(frame.shape[:2]) / 70))
    recent = history[-trail:]
    for i in range(len(visible)):
        path = np.array([h[i] for h in recent], dtype=np.float64)
        if len(path) > 1:
            cv2.polylines(out, [np.round(path).astype(np.int32)], False, (255, 220, 0), 1, cv2.LINE_AA)
        x, y = (int(round(v)) for v in recent[-1][i])
        cv2.circle(out, (x, y), radius + 1, (0, 0, 0), 2, cv2.LINE_AA)  # a dark edge: readable on any photo
        if visible[i]:
            cv2.circle(out, (x, y), radius, VISIBLE, -1, cv2.LINE_AA)
        else:
            cv2.circle(out, (x, y), radius, HIDDEN, 2, cv2.LINE_AA)
    return out


def results_picture(results: dict, height: int = 256):
    """A chart of the headline metrics per video and overall, above the first video's frames with its
    ground truth (white rings) and predictions (green dots visible, red rings not)."""
    from PIL import Image, ImageDraw, ImageFont

    names = [*results["per_video"], "overall"]
    rows = [results["per_video"][n] for n in names[:-1]] + [results["overall"]]
    colours = [(68, 1, 84), (33, 145, 140), (253, 180, 37)]
    label_w, bar_w, row_h = 240, 360, 22
    chart = Image.new("RGB", (label_w + bar_w + 110, 40 + row_h * len(rows) + 20), "white")
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default()
    legend = ["average Jaccard", "points within 1-16 px (avg)", "occlusion accuracy"]
    for j, (text, colour) in enumerate(zip(legend, colours)):
        draw.rectangle([10 + j * 220, 10, 22 + j * 220, 22], fill=colour)
        draw.text((28 + j * 220, 10), text, fill="black", font=font)
    for i, (name, metrics) in enumerate(zip(names, rows)):
        y = 40 + i * row_h
        draw.text((10, y + 4), name[:36], fill="black", font=font)
        for j, key in enumerate(HEADLINE):
            value = metrics.get(key, float("nan"))
            if np.isfinite(value):
                x0, bar_h = label_w, (row_h - 4) // 3
                draw.rectangle([x0, y + j * bar_h, x0 + value * bar_w, y + (j + 1) * bar_h - 1], fill=colours[j])
        draw.text((label_w + bar_w + 10, y + 4), f"AJ {100 * metrics['average_jaccard']:.1f}", fill="black", font=font)
    panels = [chart]
    for video, pred in results.get("previews", []):
        panels.append(Image.fromarray(_preview_strip(video, pred, height)))
    width = max(p.width for p in panels)
    canvas = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas


def _preview_strip(video, pred, height: int, count: int = 4) -> np.ndarray:
    cv2 = cv2_module()
    t = len(video.video)
    frames = sorted({int(round(i)) for i in np.linspace(0, t - 1, count)})
    gt, gt_occ = video.points[pred["kept"]], video.occluded[pred["kept"]]
    tiles = []
    for f in frames:
        tile = np.ascontiguousarray(video.video[f].copy())
        for i in range(len(gt)):
            if not gt_occ[i, f]:
                cv2.circle(tile, tuple(int(round(v)) for v in gt[i, f]), 4, (255, 255, 255), 1, cv2.LINE_AA)
            p = tuple(int(round(v)) for v in pred["points"][i, f])
            if pred["occluded"][i, f]:
                cv2.circle(tile, p, 2, HIDDEN, 1, cv2.LINE_AA)
            else:
                cv2.circle(tile, p, 2, VISIBLE, -1, cv2.LINE_AA)
        cv2.putText(tile, f"{video.name} t={f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        scale = height / tile.shape[0]
        tiles.append(cv2.resize(tile, (round(tile.shape[1] * scale), height)))
    return np.concatenate(tiles, axis=1)


__all__ = ["open_frames", "VideoWriter", "draw_tracks", "results_picture", "cv2_module"]
