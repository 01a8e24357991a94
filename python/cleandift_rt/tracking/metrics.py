"""TAP-Vid's point-tracking metrics, "query first" mode, and the videos they are computed on.

Per video (the benchmark's overall figure is the plain mean over videos):

- **occlusion accuracy**: how often the predicted visibility equals the ground truth;
- **<δ^x_avg**: for δ in 1, 2, 4, 8, 16 pixels (at 256 x 256), the fraction of ground-truth-visible
  points predicted within δ (strictly closer), averaged over the five δ;
- **average Jaccard**: for each δ, true positives / (ground-truth visible + false positives), where a
  true positive is visible in both and within δ, and a false positive is predicted visible but
  occluded in the ground truth or farther than δ; averaged over the five δ.

"Query first": each track is queried at its first visible frame, and only the frames after that
frame are evaluated (a causal tracker knows nothing before it). Tracks never visible are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLDS = (1, 2, 4, 8, 16)
EVAL_SIZE = 256  # TAP-Vid's metrics are defined on 256 x 256 frames
HEADLINE = ("average_jaccard", "average_pts_within_thresh", "occlusion_accuracy")


@dataclass
class TrackingVideo:
    """A video with ground-truth tracks, in pixels of its frames (pixel centres at integers)."""

    name: str
    video: np.ndarray  # uint8 [T, H, W, 3]
    points: np.ndarray  # float32 [N, T, 2] (x, y)
    occluded: np.ndarray  # bool [N, T]

    def __post_init__(self):
        v, p, o = self.video, self.points, self.occluded
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"video {self.name}: frames must be uint8 [T, H, W, 3], got {v.dtype} {v.shape}")
        if p.ndim != 3 or p.shape[1:] != (v.shape[0], 2) or o.shape != p.shape[:2]:
            raise ValueError(f"video {self.name}: points must be [N, T={v.shape[0]}, 2] and occluded [N, T], got "
                             f"{p.shape} and {o.shape}")


def query_first(occluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tracks kept: bool [N], query frame of each kept track [K]): the first visible frame of each
    track that is ever visible."""
    visible = ~np.asarray(occluded, dtype=bool)
    kept = visible.any(axis=1)
    return kept, visible[kept].argmax(axis=1)


def tapvid_metrics(query_frames, gt_points, gt_occluded, pred_points, pred_occluded) -> dict[str, float]:
    """The metrics of one video ("query first"): ``query_frames [N]``, points ``[N, T, 2]``, occluded ``[N, T]``.

    Keys: ``occlusion_accuracy``, ``pts_within_{δ}``, ``jaccard_{δ}``, ``average_pts_within_thresh``,
    ``average_jaccard``. A ratio with nothing to count (no visible point after the queries) is NaN.
    """
    gt_points, pred_points = np.asarray(gt_points, np.float64), np.asarray(pred_points, np.float64)
    gt_occluded, pred_occluded = np.asarray(gt_occluded, bool), np.asarray(pred_occluded, bool)
    query_frames = np.asarray(query_frames, dtype=np.int64)
    n, t = gt_occluded.shape
    if gt_points.shape != (n, t, 2) or pred_points.shape != (n, t, 2) or pred_occluded.shape != (n, t) \
            or query_frames.shape != (n,):
        raise ValueError(f"shapes disagree: query_frames {query_frames.shape}, gt points {gt_points.shape}, gt occluded "
                         f"{gt_occluded.shape}, predicted {pred_points.shape} / {pred_occluded.shape}")
    if n and (query_frames.min() < 0 or query_frames.max() >= t):
        raise ValueError(f"query frames must lie in [0, {t - 1}]")
    evaluated = np.arange(t)[None, :] > query_frames[:, None]  # frames after each track's query frame
    visible, pred_visible = ~gt_occluded, ~pred_occluded

    def ratio(num, den) -> float:
        return float(num) / float(den) if den else float("nan")

    out = {"occlusion_accuracy": ratio(((pred_occluded == gt_occluded) & evaluated).sum(), evaluated.sum())}
    distance2 = np.square(pred_points - gt_points).sum(-1)
    within_all, jaccard_all = [], []
    gt_positives = (visible & evaluated).sum()
    for d in THRESHOLDS:
        within = distance2 < d * d
        correct = within & visible
        out[f"pts_within_{d}"] = ratio((correct & evaluated).sum(), gt_positives)
        true_pos = (correct & pred_visible & evaluated).sum()
        false_pos = (((~visible) | (~within)) & pred_visible & evaluated).sum()
        out[f"jaccard_{d}"] = ratio(true_pos, gt_positives + false_pos)
        within_all.append(out[f"pts_within_{d}"])
        jaccard_all.append(out[f"jaccard_{d}"])
    out["average_pts_within_thresh"] = float(np.mean(within_all))
    out["average_jaccard"] = float(np.mean(jaccard_all))
    return out


def mean_metrics(per_video: dict[str, dict[str, float]]) -> dict[str, float]:
    """The benchmark's overall numbers: the mean of each metric over the videos (NaN videos skipped)."""
    if not per_video:
        return {}
    keys = next(iter(per_video.values())).keys()
    out = {}
    for k in keys:
        values = [m[k] for m in per_video.values() if np.isfinite(m[k])]
        out[k] = float(np.mean(values)) if values else float("nan")
    return out


__all__ = ["THRESHOLDS", "EVAL_SIZE", "HEADLINE", "TrackingVideo", "query_first", "tapvid_metrics", "mean_metrics"]
