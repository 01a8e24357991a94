"""Issue 29, class 1: ``extract --resume`` verifies instead of trusting the disk.

Every output a resumed run would count done is checked (its header, its shapes, the digest recorded
when it was written) and every input is identified by content (size, modification time, first and
last 64 KiB): a deleted, cut-short, replaced or foreign output and an image edited under the same
name are extracted again, and said so; an engine replaced under the same name and size, or a
student run with another base model, is another run; outputs found without their manifest record
are taken only when they prove to be this run's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from cleandift_rt.cli.main import main
from cleandift_rt.extraction import collect_images, extract_local, read_shards
from cleandift_rt.extraction.manifest import manifest_path
from cleandift_rt.runtime.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")
FORMATS = ("safetensors", "npz", "shards")
SHARD = 2  # images per shard: damage to one shard redoes two images


def _photo(photos, i):
    names = sorted(photos)
    return photos[names[i % 3]].resize((96 + 8 * i, 72)).rotate(11 * i)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "sub").mkdir()
    for i in range(5):
        _photo(photos, i).save(folder / ("sub" if i == 4 else ".") / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def engine_file(tmp_path_factory, tiny_onnx):
    """The us3+us6 export and its external weights, copied where a test may replace them."""
    folder = tmp_path_factory.mktemp("engine")
    src = Path(tiny_onnx["subset"])
    for name in (src.name, src.name + ".data"):
        shutil.copy(src.parent / name, folder / name)
    return folder / src.name


@pytest.fixture(scope="module")
def engine(engine_file):
    return Engine(engine_file, size=(64, 64))


def extract(engine, images, out):
    notes = []
    fmt = out.name.split("-")[0]
    summary = extract_local(engine, collect_images([images]), out, fmt=fmt, batch_size=2, shard_images=SHARD,
                            progress=False, log=notes.append)
    return summary, " ".join(notes)


def features(out: Path) -> dict:
    """{image: {tap: array}} of a finished folder, read the way a user reads it."""
    fmt = out.name.split("-")[0]
    if fmt == "shards":
        return {Path(p).name: {t: np.array(a) for t, a in f.items()} for p, f in read_shards(out)}
    suffix = ".safetensors" if fmt == "safetensors" else ".npz"
    load = load_file if fmt == "safetensors" else (lambda p: dict(np.load(p)))
    return {p.name[: -len(suffix)]: load(str(p)) for p in out.rglob(f"*{suffix}")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, engine, images):
    """One finished folder per format, and its features: copied, damaged and resumed by the tests."""
    done = {}
    for fmt in FORMATS:
        out = tmp_path_factory.mktemp("pristine") / f"{fmt}-out"
        summary, _ = extract(engine, images, out)
        assert summary.done == 5
        done[fmt] = (out, features(out))
    return done


def outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("manifest-"))


def damage(path: Path, how: str, other: Path) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: max(1, len(data) // 3)])
    elif how == "flip-header":
        path.write_bytes(data[:20] + bytes([data[20] ^ 0x55]) + data[21:])
    elif how == "flip-tail":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    else:  # "swap": a whole, readable output of another image (same shapes) put in its place
        shutil.copy(other, path)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(FORMATS), how=st.sampled_from(["delete", "truncate", "flip-header", "flip-tail", "swap"]),
       which=st.integers(0, 10))
def test_a_damaged_output_is_found_redone_and_named(tally, pristine, engine, images, tmp_path_factory, fmt, how,
                                                    which):
    src, want = pristine[fmt]
    out = tmp_path_factory.mktemp("damaged") / f"{fmt}-out"
    shutil.copytree(src, out)
    files = outputs(out)
    target, other = files[which % len(files)], files[(which + 1) % len(files)]
    if how == "swap" and target.stat().st_size != other.stat().st_size:
        how = "flip-tail"  # a swap needs a file of the same size (shards of 2 and of 1 image differ)
    damage(target, how, other)
    summary, notes = extract(engine, images, out)
    assert summary.redone and "again" in notes  # what was redone is said
    assert summary.done == len(summary.redone) <= (SHARD if fmt == "shards" else 1)  # that output's images only
    got = features(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert all(np.array_equal(got[name][t], want[name][t]) for t in want[name]), name
    again, _ = extract(engine, images, out)
    assert (again.done, again.redone, again.skipped) == (0, [], 5)  # the repaired folder verifies
    tally.checked_result()


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_image_edited_under_its_name_is_extracted_again(pristine, engine, images, photos, tmp_path, fmt):
    inputs = tmp_path / "inputs"
    shutil.copytree(images, inputs)
    src, _ = pristine[fmt]
    out = tmp_path / f"{fmt}-out"
    extract(engine, inputs, out)
    _photo(photos, 9).save(inputs / "img2.png")  # new pixels, same name
    summary, notes = extract(engine, inputs, out)
    assert [k for k, _ in summary.redone] == ["img2.png"] and "its image changed" in notes
    fresh, _ = extract(engine, inputs, tmp_path / f"{fmt}-fresh")
    got, want = features(out), features(tmp_path / f"{fmt}-fresh")
    assert all(np.array_equal(got[n][t], want[n][t]) for n in want for t in want[n])


def test_a_folder_of_other_images_with_the_same_names_is_not_already_extracted(engine, images, photos, tmp_path):
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    for i in range(5):
        _photo(photos, i + 5).save(other / ("sub" if i == 4 else ".") / f"img{i}.png")
    out = tmp_path / "safetensors-out"
    extract(engine, images, out)
    summary, _ = extract(engine, other, out)
    assert summary.skipped == 0 and len(summary.redone) == 5 and summary.done == 5


def test_an_engine_replaced_under_the_same_name_and_size_is_another_run(engine_file, images, tmp_path, capsys):
    folder = tmp_path / "engine"
    folder.mkdir()
    for p in engine_file.parent.iterdir():
        shutil.copy(p, folder / p.name)
    path = folder / engine_file.name
    args = ["extract", str(images), "--engine", str(path), "--size", "64", "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(args) == 0
    data = path.with_name(path.name + ".data")
    raw = bytearray(data.read_bytes())
    raw[-8:-4] = np.float32(0.5).tobytes()  # one weight re-exported: same file names, same sizes
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds features of another run (engine_digest" in err and "Traceback" not in err


def test_a_student_resumed_with_another_base_is_another_run(tiny_student_files, tiny_base_dir, images, tmp_path):
    from cleandift_rt.models import write_tiny_base

    other_base = write_tiny_base(tmp_path / "other_base", seed=5)
    out = tmp_path / "safetensors-out"
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(images / "img0.png", few / "img0.png")
    extract(Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(64, 64)), few, out)
    with pytest.raises(ValueError, match="holds features of another run"):
        extract(Engine(tiny_student_files["unet"], base=str(other_base), size=(64, 64)), few, out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_without_their_manifest_are_taken_only_when_they_prove_to_be_this_runs(
        pristine, engine, engine_file, images, tmp_path, fmt):
    src, want = pristine[fmt]
    same = tmp_path / f"{fmt}-out"
    shutil.copytree(src, same)
    manifest_path(same, fmt).unlink()
    summary, _ = extract(engine, images, same)
    # per-image safetensors and shards name their run and each image's digest; an .npz names nothing
    assert (summary.found, summary.done) == ((0, 5) if fmt == "npz" else (5, 0))
    # the same files under an engine that is not the one that wrote them: nothing is adopted
    folder = tmp_path / "engine"
    folder.mkdir()
    for p in engine_file.parent.iterdir():
        shutil.copy(p, folder / p.name)
    data = folder / (engine_file.name + ".data")
    raw = bytearray(data.read_bytes())
    raw[:4] = np.float32(0.25).tobytes()
    data.write_bytes(bytes(raw))
    other = tmp_path / f"{fmt}-other"
    shutil.copytree(src, other)
    manifest_path(other, fmt).unlink()
    summary, notes = extract(Engine(folder / engine_file.name, size=(64, 64)), images, other)
    assert (summary.found, summary.done) == (0, 5)
    got = features(other)
    assert any(not np.array_equal(got[n][t], want[n][t]) for n in want for t in want[n])  # really the other engine
    if fmt == "shards":
        assert "written by another run" in notes  # the old shards are named and left alone, never read


def test_a_manifest_of_the_version_that_trusted_names_is_refused_with_the_fix(pristine, engine, images, tmp_path):
    src, _ = pristine["safetensors"]
    out = tmp_path / "safetensors-out"
    shutil.copytree(src, out)
    path = manifest_path(out, "safetensors")
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["version"] = 1
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match="older cleandift-rt .* delete manifest-safetensors.jsonl"):
        extract(engine, images, out)
    os.unlink(path)
    summary, _ = extract(engine, images, out)  # the fix the message gives works: outputs verified, taken
    assert summary.found == 5
