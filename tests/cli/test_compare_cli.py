"""``cleandift-rt compare``: two engines on the same images, through the command line, JSON fields checked."""

from __future__ import annotations

import json

import pytest

from cleandift_rt.assets import PHOTOS, load_photo
from cleandift_rt.cli.main import main

FIELDS = {"cosine_min", "cosine_mean", "max_rel_error", "match_agreement", "shape_a", "shape_b"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare_images")
    for name in PHOTOS:
        load_photo(name).save(folder / f"{name}.jpg")
    return folder


def compare(*args, tmp_path) -> dict:
    out = tmp_path / "compare.json"
    assert main(["compare", *map(str, args), "--json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_an_engine_against_itself_agrees_exactly(tiny_onnx, images, tmp_path, capsys):
    engine = tiny_onnx["full"]
    result = compare(engine, engine, "--images", images, "--a-backend", "onnxruntime", "--b-backend", "onnxruntime",
                     tmp_path=tmp_path)
    assert result["images"] == result["pairs"] == len(PHOTOS)
    assert result["image_names"] == sorted(f"{p}.jpg" for p in PHOTOS)
    assert len(result["taps"]) == 11 and all(set(r) == FIELDS for r in result["taps"].values())
    for r in result["taps"].values():
        assert r["cosine_min"] == pytest.approx(1, abs=1e-9) and r["cosine_mean"] == pytest.approx(1, abs=1e-9)
        assert r["max_rel_error"] == 0 and r["match_agreement"] == 1
    for side in ("a", "b"):
        assert result[side]["backend"] == "onnxruntime" and result[side]["precision"] == "fp32"
        assert result[side]["seconds_per_image"] > 0 and result[side]["engine"] == str(engine)
    text = capsys.readouterr().out
    assert "3 images, 3 pairs" in text and "worst: cosine min 1" in text


def test_fp32_against_bf16_is_close(tiny_onnx, images, tmp_path):
    """bf16 (OpenVINO; fp32 with a warning where the CPU has no native bf16) against fp32 on ONNX Runtime:
    per-tap cosine >= 0.995 as docs/cpu.md states, match agreement >= 0.8 on 32 x 32 to 8 x 8 maps."""
    engine = tiny_onnx["full"]
    result = compare(engine, engine, "--images", images, "--taps", "mid", "us6", "--a-precision", "fp32",
                     "--a-backend", "onnxruntime", "--b-precision", "bf16", tmp_path=tmp_path)
    assert list(result["taps"]) == ["mid", "us6"] and result["b"]["backend"] == "openvino"
    for r in result["taps"].values():
        assert 0.995 <= r["cosine_min"] <= r["cosine_mean"] <= 1 and 0 <= r["max_rel_error"] < 0.5
        assert r["match_agreement"] >= 0.8


def test_compare_refuses_what_it_cannot_compare(tiny_onnx, images, tmp_path, capsys):
    subset = tiny_onnx["subset"]  # us3 and us6 only
    assert main(["compare", str(tiny_onnx["full"]), str(subset), "--images", str(images), "--taps", "mid",
                 "--size", "128"]) == 2
    assert "engine B has no mid" in capsys.readouterr().err
    assert main(["compare", str(subset), str(subset), "--images", str(images / "cat.jpg")]) == 2
    assert "at least 2" in capsys.readouterr().err
