"""The Tracker and match_points: accuracy on synthetic translations with an informative engine, visibility
of points that left the frame, several cameras in one engine call, keyframes, the point query's math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cleandift_rt as cd
from cleandift_rt.tracking import Tracker, evaluate, synthetic_video
from informative import InformativeEngine, texture_photo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def translations():
    return [synthetic_video(texture_photo(seed), "translation", frames=6, points=48, seed=seed, name=f"texture{seed}")
            for seed in range(2)]


def test_translations_are_tracked_and_points_that_left_are_not_visible(translations):
    """With features that tell every patch apart, <δavg stays above 0.9 on pure translations and the
    points that left the frame are flagged not visible in >= 95% of their frames."""
    tracker = Tracker(InformativeEngine(), radius=4.0, min_score=0.7)
    results = evaluate(tracker, translations, progress=False, keep_predictions=len(translations))
    assert results["overall"]["average_pts_within_thresh"] > 0.9, results["overall"]
    left, flagged = 0, 0
    for video, pred in results["previews"]:
        gone = video.occluded[pred["kept"]][:, 1:]
        left += gone.sum()
        flagged += (gone & pred["occluded"][:, 1:]).sum()
    assert left > 50 and flagged / left >= 0.95, (flagged, left)


def test_cameras_share_one_engine_call(translations):
    engine = InformativeEngine()
    tracker = Tracker(engine, radius=4.0, min_score=0.7)
    front, wrist = translations
    tracker.set_reference(front.video[0], front.points[:, 0], camera="front")
    tracker.set_reference(wrist.video[0], wrist.points[:, 0], camera="wrist")
    calls = engine.calls
    out = tracker.track({"front": front.video[1], "wrist": wrist.video[1]})
    assert engine.calls == calls + 1 and engine.batches[-1] == 2
    for name, video in (("front", front), ("wrist", wrist)):
        r = out[name]
        assert r.points.shape == (48, 2) and r.score.shape == (48,) and r.visible.dtype == bool
        seen = ~video.occluded[:, 1]
        assert np.median(np.linalg.norm(r.points - video.points[:, 1], axis=-1)[seen]) < 1.0
        # one camera at a time gives the same answer
        solo = Tracker(InformativeEngine(), radius=4.0, min_score=0.7)
        solo.set_reference(video.video[0], video.points[:, 0])
        np.testing.assert_allclose(solo.track(video.video[1]).points, r.points, atol=1e-4)
    with pytest.raises(ValueError, match="pass .camera: frame"):
        tracker.track(front.video[1])
    with pytest.raises(ValueError, match="no reference for camera"):
        tracker.track({"side": front.video[1]})
    tracker.reset("wrist")
    assert isinstance(tracker.track(front.video[2]), cd.TrackResult)
    tracker.reset()
    with pytest.raises(ValueError, match="no reference yet"):
        tracker.track(front.video[2])


def test_keyframes_join_the_reference(translations):
    video = translations[0]
    tracker = Tracker(InformativeEngine(), radius=4.0, min_score=0.7, keyframe_every=2, max_keyframes=1)
    tracker.set_reference(video.video[0], video.points[:, 0])
    for t in range(1, 6):
        result = tracker.track(video.video[t])
        camera = tracker.cameras[None]
        assert len(camera.keyframes) == min(1, t // 2)
        seen = ~video.occluded[:, t] & result.visible
        assert np.median(np.linalg.norm(result.points - video.points[:, t], axis=-1)[seen]) < 1.0
    assert camera.keyframes[0].valid.sum() < len(video.points)  # only points visible there answer from it


def test_reference_points_are_checked(translations):
    tracker = Tracker(InformativeEngine())
    frame = translations[0].video[0]
    with pytest.raises(ValueError, match="outside the 256 x 256"):
        tracker.set_reference(frame, [[10, 10], [300, 5]])
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        tracker.set_reference(frame, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="not in the engine's taps"):
        Tracker(InformativeEngine(), tap="us3")
    with pytest.raises(ValueError, match="min_score"):
        Tracker(InformativeEngine(), min_score=2)


def test_stretched_frames_map_back_to_their_pixels():
    """A 384 x 256 frame is stretched to the engine's 256 x 256: tracks come back in the frame's pixels."""
    image = texture_photo(3, size=256)
    wide = np.ascontiguousarray(np.repeat(image, 3, axis=1)[:, ::2])  # 256 x 384
    shifted = np.roll(wide, 6, axis=1)
    points = np.array([[100.0, 80.0], [200.0, 150.0], [300.0, 60.0]])
    tracker = Tracker(InformativeEngine(), radius=4.0, min_score=0.5)
    tracker.set_reference(wide, points)
    result = tracker.track(shifted)
    np.testing.assert_allclose(result.points, points + [6, 0], atol=1.5)
    assert result.visible.all()


def test_match_points_is_the_brute_force_nearest_neighbour():
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randn(16, 8, 8, generator=gen), torch.randn(16, 8, 8, generator=gen)
    points = torch.tensor([[1.0, 2.0], [5.5, 3.25], [0.0, 7.0]])
    found, score = cd.match_points(src, points, dst, refine=False)
    grid = points / 7 * 2 - 1  # feature pixels, align_corners
    q = F.grid_sample(src[None], grid[None, :, None], align_corners=True)[0, :, :, 0].T
    sims = F.normalize(q, dim=1) @ F.normalize(dst.flatten(1), dim=0)
    best = sims.argmax(1)
    torch.testing.assert_close(found, torch.stack([best % 8, best // 8], 1).float())
    torch.testing.assert_close(score, sims.max(1).values)
    # image pixels of a 64 x 64 image, refined; numpy in -> numpy out
    xy, s = cd.match_points(src.numpy(), (points.numpy() + 0.5) * 8 - 0.5, dst.numpy(), image_size=(64, 64))
    assert isinstance(xy, np.ndarray) and xy.shape == (3, 2) and s.shape == (3,)
    assert np.abs(xy - ((found.numpy() + 0.5) * 8 - 0.5)).max() <= 2 * 8  # within the refinement window
    with pytest.raises(ValueError, match="points must be"):
        cd.match_points(src, torch.zeros(3), dst)
    with pytest.raises(ValueError, match="both be single maps"):
        cd.match_points(src, points, dst[None])
