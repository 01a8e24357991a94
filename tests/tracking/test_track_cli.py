"""``cleandift-rt track`` and ``eval-tracking`` end to end on the tiny Robot-DIFT package (PyTorch backend)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from cleandift_rt.cli.main import main as cli_main
from cleandift_rt.tracking import synthetic_video
from cleandift_rt.tracking.video import VideoWriter, open_frames
from informative import texture_photo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return synthetic_video(texture_photo(1, size=320), "translation", frames=4, points=4, size=128)


def engine_args(robot_package, tiny_base_dir):
    return ["--engine", str(robot_package), "--base", str(tiny_base_dir), "--size", "64", "--no-progress"]


def test_track_a_video_and_a_frames_folder(clip, robot_package, tiny_base_dir, tmp_path):
    video_path = tmp_path / "clip.mp4"
    with VideoWriter(video_path, fps=10) as writer:
        for frame in clip.video:
            writer.write(frame)
    out = tmp_path / "tracks.mp4"
    args = ["track", str(video_path), "--points", "30,40 90,60", "--prompt", "insert the pin", "--out", str(out)]
    assert cli_main(args + engine_args(robot_package, tiny_base_dir)) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert [f["index"] for f in record["frames"]] == [0, 1, 2, 3]
    assert record["frames"][0]["points"] == [[30.0, 40.0], [90.0, 60.0]]
    assert all(len(f["points"]) == len(f["score"]) == len(f["visible"]) == 2 for f in record["frames"])
    assert record["robot_dift"]["latent"] == "mode" and record["taps"] == ["us6"]
    frames, fps, count = open_frames(out)
    written = list(frames)
    assert len(written) == 4 and written[0].shape == (128, 128, 3) and fps == pytest.approx(10)

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(clip.video):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    tracks = tmp_path / "folder.json"
    assert cli_main(["track", str(folder), "--points", "50,50", "--reference-frame", "1", "--taps", "us6", "us8",
                     "--out", str(tmp_path / "folder.avi"), "--json", str(tracks)]
                    + engine_args(robot_package, tiny_base_dir)) == 0
    record = json.loads(tracks.read_text())
    assert [f["index"] for f in record["frames"]] == [1, 2, 3] and record["taps"] == ["us6", "us8"]


@pytest.mark.parametrize("points, error", [("30;40", "pixel pairs"), ("1,2,3", "pixel pairs"), ("400,10", "outside")])
def test_track_refuses_bad_points(clip, robot_package, tiny_base_dir, tmp_path, points, error, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(clip.video[0]).save(folder / "0.png")
    args = ["track", str(folder), "--points", points, "--out", str(tmp_path / "t.mp4")]
    assert cli_main(args + engine_args(robot_package, tiny_base_dir)) == 2
    assert error in capsys.readouterr().err


def test_eval_tracking_on_synthetic_videos_and_tapvid(clip, robot_package, tiny_base_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(texture_photo(2, size=256)).save(photos / "texture.png")
    out = tmp_path / "synthetic"
    assert cli_main(["eval-tracking", "--synthetic", str(photos), "--motions", "translation", "scale", "--frames", "3",
                     "--points", "8", "--out", str(out)] + engine_args(robot_package, tiny_base_dir)) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_video"]) == {"texture-translation", "texture-scale"}
    for m in [results["overall"], *results["per_video"].values()]:
        assert {"average_jaccard", "average_pts_within_thresh", "occlusion_accuracy", "jaccard_16"} <= set(m)
        assert 0 <= m["average_pts_within_thresh"] <= 1
    assert Image.open(out / "results.png").size[0] > 256

    pkl = tmp_path / "tapvid_davis.pkl"
    points = (clip.points + 0.5) / 128  # back to TAP-Vid's [0, 1]
    with open(pkl, "wb") as f:
        pickle.dump({"clip": {"video": clip.video, "points": points, "occluded": clip.occluded}}, f)
    args = ["eval-tracking", "--tapvid", str(pkl), "--out", str(tmp_path / "davis")] + \
        engine_args(robot_package, tiny_base_dir)
    assert cli_main(args) == 2 and "allow_pickle=True" in capsys.readouterr().err
    assert cli_main(args + ["--allow-pickle"]) == 0
    results = json.loads((tmp_path / "davis" / "results.json").read_text())
    assert list(results["per_video"]) == ["clip"] and results["per_video"]["clip"]["tracks"] == 4
    assert np.isfinite(results["overall"]["occlusion_accuracy"])
