"""TAP-Vid metrics on hand-made cases, query-first sampling, the TAP-Vid reader and the synthetic videos."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cleandift_rt.tracking import load_tapvid, query_first, synthetic_video, tapvid_metrics, mean_metrics
from cleandift_rt.tracking.synthetic import MOTIONS, view_homographies


def test_perfect_predictions_score_one():
    gt = np.random.default_rng(0).uniform(0, 255, (3, 5, 2))
    occ = np.zeros((3, 5), bool)
    occ[1, 3:] = True
    m = tapvid_metrics([0, 0, 0], gt, occ, gt, occ)
    assert m["occlusion_accuracy"] == m["average_jaccard"] == m["average_pts_within_thresh"] == 1.0


def test_hand_made_case():
    """One track, query frame 0, frames 1..3 evaluated. Frame 1: 1.5 px off (within 2, 4, 8, 16 but not 1);
    frame 2: exact but predicted occluded; frame 3: occluded in truth, predicted visible."""
    gt = np.zeros((1, 4, 2))
    pred = gt.copy()
    pred[0, 1] = [1.5, 0.0]
    gt_occ = np.array([[False, False, False, True]])
    pred_occ = np.array([[False, False, True, False]])
    m = tapvid_metrics([0], gt, gt_occ, pred, pred_occ)
    assert m["occlusion_accuracy"] == pytest.approx(1 / 3)  # frame 1 right, 2 and 3 wrong
    # visible in truth after the query: frames 1 and 2, both within 2 px and more, only frame 2 within 1
    assert m["pts_within_1"] == pytest.approx(1 / 2)
    assert m["pts_within_2"] == pytest.approx(1.0)
    assert m["average_pts_within_thresh"] == pytest.approx((0.5 + 1 + 1 + 1 + 1) / 5)
    # δ = 1: true positives none (frame 1 too far, frame 2 predicted occluded); false positives frame 1 (too far)
    # and frame 3 (occluded in truth); gt positives 2 -> 0 / 4. δ >= 2: TP frame 1; FP frame 3 -> 1 / 3.
    assert m["jaccard_1"] == 0.0
    assert m["jaccard_2"] == pytest.approx(1 / 3)
    assert m["average_jaccard"] == pytest.approx((0 + 4 / 3) / 5)


def test_query_first_evaluates_only_frames_after_the_query():
    gt = np.zeros((1, 4, 2))
    pred = gt + 100.0  # wrong everywhere...
    pred[0, 3] = 0.0  # ...except after the query frame
    occ = np.array([[True, True, False, False]])
    kept, queries = query_first(occ)
    assert kept.tolist() == [True] and queries.tolist() == [2]
    m = tapvid_metrics(queries, gt, occ, pred, occ)
    assert m["average_pts_within_thresh"] == 1.0 and m["occlusion_accuracy"] == 1.0


def test_tracks_never_visible_are_dropped_and_means_skip_nan():
    kept, _ = query_first(np.array([[True, True], [False, True]]))
    assert kept.tolist() == [False, True]
    assert mean_metrics({"a": {"x": 1.0}, "b": {"x": float("nan")}, "c": {"x": 0.0}})["x"] == 0.5


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes disagree"):
        tapvid_metrics([0], np.zeros((1, 3, 2)), np.zeros((1, 3), bool), np.zeros((1, 4, 2)), np.zeros((1, 3), bool))


@pytest.mark.parametrize("motion", MOTIONS)
def test_synthetic_ground_truth_follows_the_pixels(photos, motion):
    """The ground truth is exact: the first frame's colour at a query point is found at its tracked
    position in a later frame (bilinear read), and every motion takes some points out of the frame."""
    video = synthetic_video(photos["coffee"], motion, frames=6, points=32, size=128, seed=1)
    assert video.video.shape == (6, 128, 128, 3) and video.points.shape == (32, 6, 2)
    assert not video.occluded[:, 0].any() and video.occluded[:, -1].any()

    import cv2

    def colour(frame, xy):  # blurred first: query points sit on corners, where colour changes fast
        return cv2.getRectSubPix(cv2.GaussianBlur(frame, (0, 0), 2.0), (1, 1), tuple(map(float, xy)))[0, 0].astype(float)

    inside = [(i, t) for i in range(32) for t in (2, 3) if (video.points[i, t] > 2).all() and (video.points[i, t] < 125).all()]
    err = [np.abs(colour(video.video[t], video.points[i, t]) - colour(video.video[0], video.points[i, 0])).mean()
           for i, t in inside]
    shuffled = [np.abs(colour(video.video[t], video.points[(i + 7) % 32, t]) - colour(video.video[0], video.points[i, 0]))
                .mean() for i, t in inside]
    assert len(inside) > 10 and np.median(err) < 6 < np.median(shuffled)  # same surface point, resampled twice


def test_view_homographies_start_centred():
    views = view_homographies("rotation", 5, 64, (200, 300))
    np.testing.assert_allclose(views[0] @ [31.5, 31.5, 1], [149.5, 99.5, 1])


def write_tapvid(path, frames=4, size=96):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (frames, size, size + 32, 3), dtype=np.uint8)
    points = rng.uniform(0.1, 0.9, (5, frames, 2))
    occluded = np.zeros((5, frames), bool)
    occluded[0] = True  # never visible: dropped in query-first mode
    occluded[1, 0] = True
    with open(path, "wb") as f:
        pickle.dump({"clip": {"video": video, "points": points, "occluded": occluded}}, f)
    return points


def test_tapvid_reader_needs_allow_pickle_and_resizes_to_256(tmp_path):
    path = tmp_path / "tapvid_davis.pkl"
    points = write_tapvid(path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_tapvid(path)
    (video,) = list(load_tapvid(path, allow_pickle=True))
    assert video.name == "clip" and video.video.shape == (4, 256, 256, 3)
    np.testing.assert_allclose(video.points, points * 256 - 0.5, rtol=1e-6)
