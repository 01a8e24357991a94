"""The ``cleandift-rt`` command line, through ``main([...])``: help, demo, info, match, pca, extract,
bench, eval-spair (with the DIFT baseline) and eval-pairs, plus the one-line errors for bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cleandift_rt.cli.main import build_parser, main


def _not_blank(path) -> bool:
    img = Image.open(path).convert("RGB")
    return np.asarray(img).std() > 10 and img.getcolors(maxcolors=1000) is None  # > 1000 distinct colours


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (tiny model -> ONNX -> Engine -> pictures); its ONNX file serves the other tests."""
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--out", str(out), "--size", "128"]) == 0
    return {"dir": out, "onnx": out / "model" / "tiny.onnx", "stdout": buf.getvalue()}


@pytest.fixture(scope="module")
def torch_engine(tiny_student_files, tiny_base_dir):
    """Engine arguments for the PyTorch backend (a student file + its base): no ONNX session to build."""
    return ["--engine", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--size", "128", "128"]


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("demo", "match", "pca", "extract", "info", "build-info", "bench", "eval-spair", "eval-pairs"):
        assert cmd in text
    assert "cleandift-rt demo --out" in text
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, p in sub.items():
        if name != "build-info":
            assert "example" in p.format_help(), name
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([]) == 2  # no command: the overview on stderr and a failing status, not a traceback or 0
    assert "cleandift-rt demo --out" in err.getvalue() and "error: name a command" in err.getvalue()


def test_demo_writes_readable_pictures_and_says_it_is_untrained(demo):
    d = demo["dir"]
    for name in ("matches_cat.png", "keypoints_cat.png", "pca.png"):
        img = Image.open(d / name)
        assert img.width >= 500 and img.height >= 300, name
        assert _not_blank(d / name), name
    summary = json.loads((d / "demo.json").read_text())
    assert summary["model"]["trained"] is False and summary["taps"]["us6"] == [4, 64, 8, 8]
    assert summary["cat_vs_warped_cat"]["mutual_matches"] > 0
    assert "UNTRAINED" in demo["stdout"] and "export/export_onnx.py" in demo["stdout"]
    assert "us10" in demo["stdout"]  # the tap shapes are printed


def test_info_and_build_info(demo, capsys, tmp_path):
    assert main(["info", str(demo["onnx"])]) == 0
    out = capsys.readouterr().out
    assert "us6 (64 ch, /16)" in out and "input size (H, W): [128, 128]" in out and "stretch" in out
    assert main(["info", str(demo["onnx"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "onnx"
    assert main(["build-info"]) == 0
    assert "cleandift-rt" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_match_dense_and_keypoints(torch_engine, photos, tmp_path, capsys):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    photos["cat"].save(a)
    photos["cat"].transpose(Image.FLIP_LEFT_RIGHT).save(b)
    png, js = tmp_path / "m.png", tmp_path / "m.json"
    assert main(["match", str(a), str(b), *torch_engine, "--out", str(png), "--json", str(js)]) == 0
    assert _not_blank(png)
    doc = json.loads(js.read_text())
    sims = [m["similarity"] for m in doc["matches"]]
    assert 0 < len(sims) <= 64 and sims == sorted(sims, reverse=True)  # mutual NN of two 8x8 grids, best first
    assert all(0 <= m["a"][0] < 451 and 0 <= m["b"][1] < 300 for m in doc["matches"])
    kp = tmp_path / "kp.png"
    assert main(["match", str(a), str(b), *torch_engine, "--out", str(kp), "--points", "100,100 200,150",
                 "--json", str(js)]) == 0
    assert len(json.loads(js.read_text())["matches"]) == 2 and kp.is_file()
    capsys.readouterr()
    assert main(["match", str(a), str(b), *torch_engine, "--out", str(kp), "--points", "900,5"]) == 2
    assert "outside image A" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert main(["match", str(a), str(tmp_path / "bad.jpg"), *torch_engine, "--out", str(kp)]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_pca(torch_engine, photos, tmp_path):
    paths = []
    for n in ("cat", "coffee"):
        photos[n].save(tmp_path / f"{n}.jpg")
        paths.append(str(tmp_path / f"{n}.jpg"))
    assert main(["pca", *paths, *torch_engine, "--out", str(tmp_path / "pca.png"), "--height", "100"]) == 0
    img = Image.open(tmp_path / "pca.png")
    assert img.height == 30 + 200 + 10 + 40 + 20 and _not_blank(tmp_path / "pca.png")


def test_extract_is_resumable_and_skips_unreadable_images(torch_engine, photos, tmp_path, capsys):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    photos["cat"].save(src / "cat.jpg")
    photos["coffee"].save(src / "sub" / "coffee.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "feats"
    args = ["extract", str(src), *torch_engine, "--out", str(out), "--taps", "us6", "us9", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "wrote 2 feature file(s)" in text and "skipped 1 unreadable image(s)" in text and "broken.jpg" in text
    from safetensors.numpy import load_file

    f = load_file(str(out / "sub" / "coffee.png.safetensors"))  # the full image name: never shared
    assert set(f) == {"us6", "us9"} and f["us6"].shape == (64, 8, 8) and f["us9"].shape == (64, 16, 16)
    assert main(args) == 0
    assert "2 already extracted, 1 to do" in capsys.readouterr().out
    assert main(["extract", str(src / "cat.jpg"), *args[2:-1], "--format", "npz", "--no-progress"]) == 0
    with np.load(out / "cat.jpg.npz") as z:
        # batches of 2 then of 1: PyTorch's convolutions round differently by batch size
        assert np.allclose(z["us6"], load_file(str(out / "cat.jpg.safetensors"))["us6"], rtol=1e-4, atol=1e-4)
    assert main(["extract", str(tmp_path / "nothing"), *torch_engine, "--out", str(out)]) == 2


def test_bench(torch_engine, capsys):
    assert main(["bench", *torch_engine, "--repeat", "1"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, status 2
        main(["bench", *torch_engine, "--repeat", "0"])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert "images/s" in out and "cleandift_rt.match" in out


def test_eval_spair_onnx_engine_without_base_uses_the_baked_prompt(demo, spair, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["eval-spair", "--root", str(spair["root"]), "--engine", str(demo["onnx"]), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "note: no --base given" in text and "PCK (%) on SPair-71k test" in text
    doc = json.loads(out.read_text())
    for kind in ("bbox", "img"):
        for a in ("0.05", "0.1", "0.15"):
            for avg in ("point", "image"):
                assert 0 <= doc["pck"][kind][a][avg] <= 100
    assert doc["counts"]["pairs"] == 6 and doc["counts"]["keypoints"] == 6 * 12
    assert doc["counts"]["skipped"]["pairs"]["malformed annotation"] == 3
    assert doc["counts"]["skipped"]["pairs"]["image cannot be decoded"] == 1
    assert doc["per_category"]["coffee"]["pairs"] == 2 and "baseline" not in doc
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == (1 + 1 + 2) * 2 * 3 * 2  # (all, category mean, 2 categories) x kinds x alphas x averages


def test_eval_spair_with_the_dift_baseline_side_by_side(torch_engine, tiny_student_files, spair, tmp_path,
                                                        capsys):
    out = tmp_path / "r.json"
    args = ["eval-spair", "--root", str(spair["root"]), *torch_engine, "--out", str(out), "--baseline", "dift",
            "--t", "261", "--ensemble", "2", "--categories", "coffee", "--threshold", "tlfr", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "cleandift" in text and "dift" in text
    doc = json.loads(out.read_text())
    assert doc["method"]["prompt"] == "a photo of a {category}" and doc["protocol"]["comparison"] == "<"
    assert doc["baseline"]["method"] == {"method": "dift", "tap": "us6", "prompt": "a photo of a {category}", "t": 261,
                                         "ensemble": 2, "seed": 0, "size": [128, 128]}
    assert doc["baseline"]["counts"]["pairs"] == doc["counts"]["pairs"] == 2
    assert main(args) == 0  # resumes from the journals: nothing is recomputed
    text = capsys.readouterr().out
    assert text.count("0 images extracted") == 2 and text.count("2 pairs resumed") == 2
    assert json.loads(out.read_text())["pck"] == doc["pck"]
    assert main(["eval-spair", "--root", str(spair["root"]), "--engine", str(tiny_student_files["unet"]),
                 "--out", str(out)]) == 2  # a student file needs --base
    assert "base" in capsys.readouterr().err


def test_eval_pairs_json(torch_engine, spair, tmp_path, capsys):
    root = spair["root"] / "JPEGImages" / "cat"
    truth = next(v for k, v in spair["truth"].items() if "cat_flip" in k and k.startswith("000000"))
    doc = {"images_root": str(root), "pairs": [
        {"source": "cat_src.jpg", "target": "cat_flip.jpg", "source_points": truth[0].tolist(),
         "target_points": truth[1].tolist(), "category": "cat"}]}
    (tmp_path / "pairs.json").write_text(json.dumps(doc))
    assert main(["eval-pairs", str(tmp_path / "pairs.json"), *torch_engine, "--out", str(tmp_path / "p.json"),
                 "--transfer", "analytic", "--no-progress"]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["protocol"]["transfer"] == "analytic"
    assert res["counts"] == {**res["counts"], "pairs": 1, "keypoints": 12}
    assert main(["eval-pairs", str(tmp_path / "pairs.json"), *torch_engine, "--out", str(tmp_path / "p.txt")]) == 2
    assert "results are written as JSON" in capsys.readouterr().err
