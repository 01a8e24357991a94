"""The local extractor (issue 18): collision-free names, old-scheme resume, the manifest, shards and
their reader, unreadable images, the folder lock and the extract command's refusals."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from cleandift_rt import read_shards
from cleandift_rt.cli.main import main
from cleandift_rt.extraction import collect_images, default_batch_size, engine_config, extract_local, open_run
from cleandift_rt.extraction.manifest import Manifest, manifest_path
from cleandift_rt.runtime.engine import Engine

SIZE = ["--size", "64", "64"]


@pytest.fixture(scope="module")
def engine(subset_engine):
    return subset_engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """Seven photos: two share the stem 'a' (a.jpg, a.png), one in a subfolder."""
    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    small = {n: p.resize((96, 80)) for n, p in photos.items()}
    small["cat"].save(d / "a.jpg")
    small["coffee"].save(d / "a.png")
    small["astronaut"].save(d / "b.jpg")
    small["coffee"].rotate(90).save(d / "c.webp")
    small["cat"].transpose(Image.FLIP_LEFT_RIGHT).save(d / "sub" / "d.png")
    small["astronaut"].rotate(180).save(d / "sub" / "e.jpg")
    small["cat"].rotate(45).save(d / "f.bmp")
    return d


def quiet(*_):
    pass


def extract(engine, folder, out, **kw):
    kw.setdefault("progress", False)
    return extract_local(engine, collect_images([folder]), out, log=quiet, **kw)


def direct(engine, path) -> dict:
    """Features of one image through Engine.extract, batch 1 (the reference)."""
    from cleandift_rt.features.preprocess import load_image

    return {t: f[0] for t, f in engine.extract([load_image(path)]).items()}


def assert_features_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for t in want:
        np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6, err_msg=t)


def test_same_stem_images_get_their_own_outputs(engine, folder, tmp_path, capsys):
    out = tmp_path / "feats"
    args = ["extract", str(folder), "--engine", str(engine.path), *SIZE, "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "wrote 7 feature file(s)" in capsys.readouterr().out
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert names == ["a.jpg.safetensors", "a.png.safetensors", "b.jpg.safetensors", "c.webp.safetensors",
                     "f.bmp.safetensors", "sub/d.png.safetensors", "sub/e.jpg.safetensors"]
    for name in names:  # each file holds its own image's features (a.jpg and a.png differ)
        assert_features_equal(load_file(str(out / name)), direct(engine, folder / name[: -len(".safetensors")]))
    assert not np.allclose(load_file(str(out / "a.jpg.safetensors"))["us6"], load_file(str(out / "a.png.safetensors"))["us6"])
    assert main(args) == 0
    assert "7 already extracted, 0 to do" in capsys.readouterr().out


def _old_scheme(engine, folder, out, fmt):
    """What the extractor before issue 18 wrote: the suffix replaced, a.png overwriting a.jpg's file."""
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        feats = direct(engine, src)
        dst = out / src.relative_to(folder).with_suffix("." + fmt)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "safetensors":
            save_file(feats, str(dst), metadata={"image": str(src), "width": "96", "height": "80",
                                                 "engine": str(engine.path), "taps": "us3,us6", "input_size": "64x64"})
        else:
            np.savez(dst, **feats)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_old_scheme_files_are_not_adopted_and_never_touched(engine, folder, tmp_path, fmt):
    """Files of the scheme before issue 18 record neither the run nor the image they were made from,
    so their engine cannot be proven (issue 29): every image is extracted again under its own name,
    and the old files are left as they were."""
    out = tmp_path / "old"
    _old_scheme(engine, folder, out, fmt)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    summary = extract(engine, folder, out, fmt=fmt)
    manifest = Manifest.open(out, engine_config(engine, fmt), log=quiet)
    manifest.close()
    assert (summary.found, summary.done) == (0, 7)
    assert manifest.done["a.png"] == f"a.png.{fmt}" and manifest.done["sub/d.png"] == f"sub/d.png.{fmt}"
    assert all(p.read_bytes() == data for p, data in before.items())  # old files are never rewritten or deleted
    assert len(manifest.done) == 7


def test_shards_round_trip_through_the_reader_and_plain_safetensors(engine, folder, tmp_path):
    out = tmp_path / "shards"
    summary = extract(engine, folder, out, fmt="shards", shard_images=3, batch_size=2)
    assert summary.done == 7 and len(list(out.glob("shard-*.safetensors"))) == 3
    got = dict(read_shards(out))
    assert sorted(got) == sorted(str(p) for p in folder.rglob("*") if p.is_file())
    for path, feats in got.items():
        assert_features_equal(feats, direct(engine, path))
    plain = {}  # docs/scale.md's reader: safetensors and json only
    for line in manifest_path(out, "shards").read_text().splitlines()[1:]:
        record = json.loads(line)
        with safe_open(str(out / record["shard"]), framework="np") as f:
            paths = json.loads(f.metadata()["paths"])
            us6 = f.get_tensor("us6")
        plain.update({p: us6[i] for i, p in enumerate(paths)})
    assert plain.keys() == got.keys() and all(np.array_equal(plain[p], got[p]["us6"]) for p in plain)
    only_us6 = dict(read_shards(out, taps=["us6"]))
    assert all(set(f) == {"us6"} for f in only_us6.values())
    bare = tmp_path / "bare"  # shards copied without their manifest still read, each image once
    bare.mkdir()
    for shard in out.glob("shard-*.safetensors"):
        shutil.copy(shard, bare / shard.name)
    assert sorted(dict(read_shards(bare))) == sorted(got)
    with pytest.raises(ValueError, match="no taps"):
        next(read_shards(out, taps=["mid"]))
    with pytest.raises(ValueError, match="holds no shards"):
        next(read_shards(tmp_path))


def test_unrecorded_shards_are_adopted_and_duplicates_removed(engine, folder, tmp_path):
    out = tmp_path / "shards"
    extract(engine, folder, out, fmt="shards", shard_images=4)
    path = manifest_path(out, "shards")
    lines = path.read_text().splitlines(keepends=True)
    last = json.loads(lines[-1])
    path.write_text("".join(lines[:-1]))  # killed after writing the last shard, before its record
    shutil.copy(out / json.loads(lines[1])["shard"], out / "shard-0000duplicate.safetensors")
    (out / "shard-foreign.safetensors").write_bytes(b"not a shard")
    notes = []
    summary = extract_local(engine, collect_images([folder]), out, fmt="shards", progress=False, log=notes.append)
    assert (summary.done, summary.found, summary.skipped) == (0, len(last["images"]), 7)
    assert not (out / "shard-0000duplicate.safetensors").exists()  # all its images are listed elsewhere
    assert any("shard-foreign" in n for n in notes) and (out / "shard-foreign.safetensors").exists()
    assert len(dict(read_shards(out))) == 7


def test_unreadable_images_are_listed_and_retried_never_fatal(engine, tmp_path, photos):
    src = tmp_path / "in"
    src.mkdir()
    photos["cat"].resize((96, 80)).save(src / "good.jpg")
    photos["cat"].resize((32, 32)).save(src / "tiny.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (src / "folder.jpg").mkdir()  # a folder with an image's suffix is not an input
    out = tmp_path / "out"
    summary = extract(engine, src, out)
    assert summary.done == 1 and sorted(p.rsplit("/", 1)[-1] for p, _ in summary.failed) == ["broken.jpg", "tiny.png"]
    why = dict(summary.failed)
    assert "cannot decode" in why[str(src / "broken.jpg")] and "at least 64 px" in why[str(src / "tiny.png")]
    photos["cat"].resize((96, 80)).save(src / "tiny.png")  # fixed by the user: the next run takes it
    again = extract(engine, src, out)
    assert (again.skipped, again.done, len(again.failed)) == (1, 1, 1)


def test_a_folder_holds_one_run(engine, folder, tmp_path, capsys):
    out = tmp_path / "feats"
    extract(engine, folder, out)
    args = ["extract", str(folder), "--engine", str(engine.path), *SIZE, "--out", str(out), "--no-progress"]
    assert main([*args, "--taps", "us6"]) == 2  # other taps than the folder's
    assert "holds features of another run" in capsys.readouterr().err
    items = collect_images([folder])
    with open_run(out, items, engine_config(engine, "safetensors"), log=quiet):
        with pytest.raises(RuntimeError, match="another extraction is writing"):
            open_run(out, items, engine_config(engine, "safetensors"), log=quiet)
    (tmp_path / "file").write_text("")
    assert main([*args[:-3], "--out", str(tmp_path / "file" / "x"), "--no-progress"]) == 2
    assert "is under" in capsys.readouterr().err


def test_manifest_drops_a_cut_short_record(engine, tmp_path):
    config = engine_config(engine, "safetensors")
    with Manifest.open(tmp_path, config, log=quiet) as m:
        m.record_files([("a.jpg", "a.jpg.safetensors")])
        m.record_files([("b.jpg", "b.jpg.safetensors")], failed=[("c.jpg", "c.jpg", "cannot decode")])
    path = manifest_path(tmp_path, "safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-9])  # killed mid-append
    notes = []
    with Manifest.open(tmp_path, config, log=notes.append) as m:
        assert list(m.done) == ["a.jpg"] and not m.failed
    assert "cut-short" in notes[0] and path.read_bytes().endswith(b"\n")


def test_extract_refusals(engine, folder, tmp_path, capsys, monkeypatch):
    base = ["extract", str(folder), "--engine", str(engine.path), *SIZE, "--out", str(tmp_path / "o")]
    assert main([*base, "--ray", "--format", "npz"]) == 2
    assert "--format shards" in capsys.readouterr().err
    assert main([*base, "--concurrency", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    monkeypatch.delitem(sys.modules, "cleandift_rt.distributed.pipeline", raising=False)
    monkeypatch.delitem(sys.modules, "cleandift_rt.distributed", raising=False)
    assert main([*base, "--ray", "--format", "shards"]) == 2
    assert "pip install 'cleandift-rt[distributed]'" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "none"), "--engine", str(engine.path), "--out", str(tmp_path)]) == 2


def test_a_tap_outside_the_tap_table_is_written_with_its_probed_shape(engine, folder, tmp_path):
    """An engine may return more than the file's taps ("hyper" with an aggregator): its shape comes
    from one blank image through the engine, and it is written like the others."""

    class WithPooled:
        def __init__(self, inner):
            self.inner, self.taps = inner, (*inner.taps, "pooled")

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def extract(self, images, taps=None):
            out = self.inner.extract(images, taps=sorted({*taps, "us6"} - {"pooled"}))
            out["pooled"] = out["us6"].mean(dim=(2, 3))[:, :, None, None]  # C x 1 x 1: no tap table row
            return {t: out[t] for t in taps}

    summary = extract(WithPooled(engine), folder, tmp_path / "o", fmt="shards")
    assert summary.done == 7
    for path, feats in read_shards(tmp_path / "o"):
        assert feats["pooled"].shape == (64, 1, 1)
        np.testing.assert_allclose(feats["pooled"][:, 0, 0], feats["us6"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_default_batch_size(engine):
    class Plan:
        name = "tensorrt"

        class info:  # noqa: N801 - stands in for ArtifactInfo
            batch = {"min": 1, "opt": 8, "max": 16}

    class PlanEngine:
        backend, max_batch = Plan, 16

    assert default_batch_size(engine) == 4  # ONNX Runtime on the CPU
    assert default_batch_size(PlanEngine) == 8  # a plan's optimal batch
    PlanEngine.max_batch = 2
    assert default_batch_size(PlanEngine) == 2
