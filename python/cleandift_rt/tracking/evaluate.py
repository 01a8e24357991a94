"""Run a ``Tracker`` over ground-truth videos (TAP-Vid or synthetic) and score it with TAP-Vid's metrics.

Each video's frames go through the engine once (in batches); then, query-first, the tracks are
grouped by their query frame and each group is tracked causally from that frame on, exactly as a
robot would (the reference is the query frame; keyframes when the tracker has them).
"""

from __future__ import annotations

import time
from typing import Iterable

import numpy as np

from .metrics import HEADLINE, TrackingVideo, mean_metrics, query_first, tapvid_metrics
from .tracker import Tracker

EXTRACT_BATCH = 8


def track_video(tracker: Tracker, video: TrackingVideo, batch: int = EXTRACT_BATCH) -> dict:
    """Predictions for one video: ``points [K, T, 2]``, ``occluded [K, T]``, ``query_frames [K]`` and
    ``kept [N]`` (the tracks that are ever visible), plus the seconds spent in the engine and in tracking."""
    kept, queries = query_first(video.occluded)
    gt = video.points[kept]
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(video.video), batch):
        feats.extend(tracker.features(list(video.video[i:i + batch])))
    extract_seconds = time.perf_counter() - t0
    k, t = gt.shape[:2]
    points = np.zeros((k, t, 2), np.float32)
    occluded = np.ones((k, t), bool)
    t1 = time.perf_counter()
    for q in np.unique(queries):
        rows = np.flatnonzero(queries == q)
        tracker.reset()
        tracker.set_reference(feats[q], gt[rows, q])
        points[rows, q], occluded[rows, q] = gt[rows, q], False
        for frame in range(q + 1, t):
            result = tracker.track(feats[frame])
            points[rows, frame], occluded[rows, frame] = result.points, ~result.visible
    tracker.reset()
    return {"points": points, "occluded": occluded, "query_frames": queries, "kept": kept,
            "extract_seconds": extract_seconds, "track_seconds": time.perf_counter() - t1}


def evaluate(tracker: Tracker, videos: Iterable[TrackingVideo], total: int | None = None, progress: bool = True,
             keep_predictions: int = 1) -> dict:
    """Per-video and overall metrics (the mean over videos), with timings; the predictions of the first
    ``keep_predictions`` videos are returned too (for pictures)."""
    from tqdm import tqdm

    per_video, timing, previews = {}, {}, []
    for video in tqdm(videos, total=total, desc="eval-tracking", unit="video", disable=not progress):
        pred = track_video(tracker, video)
        kept = pred["kept"]
        metrics = tapvid_metrics(pred["query_frames"], video.points[kept], video.occluded[kept], pred["points"],
                                 pred["occluded"])
        per_video[video.name] = {**metrics, "tracks": int(kept.sum()), "frames": int(len(video.video))}
        timing[video.name] = {"extract_seconds": pred["extract_seconds"], "track_seconds": pred["track_seconds"]}
        if len(previews) < keep_predictions:
            previews.append((video, pred))
    if not per_video:
        raise ValueError("no videos to evaluate (empty TAP-Vid file or photo folder)")
    overall = mean_metrics({name: {k: v for k, v in m.items() if k not in ("tracks", "frames")}
                            for name, m in per_video.items()})
    return {"overall": overall, "per_video": per_video, "timing": timing, "previews": previews}


def summary_lines(results: dict) -> list[str]:
    """The headline numbers, overall and per video, as text."""
    def line(label: str, m: dict) -> str:
        return (f"{label:32s} AJ {100 * m['average_jaccard']:5.1f}  <δavg {100 * m['average_pts_within_thresh']:5.1f}"
                f"  OA {100 * m['occlusion_accuracy']:5.1f}")

    lines = [line(name, m) for name, m in results["per_video"].items()]
    return lines + [line(f"overall ({len(results['per_video'])} videos)", results["overall"])]


__all__ = ["track_video", "evaluate", "summary_lines", "HEADLINE"]
