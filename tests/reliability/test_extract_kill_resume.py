"""Kill-and-resume for ``cleandift-rt extract``: SIGKILLed mid output write, mid manifest write,
between batches, mid shard and mid manifest repair, resumed every time with the same command.

At the end every image is extracted exactly once (each listed by one manifest record, each in
one file), nothing the kills interrupted is left behind, and the features equal an uninterrupted
run's bit for bit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from cleandift_rt.cli.main import main
from cleandift_rt.extraction import read_manifest, read_shards

DRIVER = Path(__file__).with_name("extract_kill_driver.py")
SCHEDULES = {
    # 13 readable images in batches of 2 (7 batches), one unreadable
    "safetensors": [("output", 3), ("record", 2), ("manifest", 2), ("batch", 2)],
    # shards of 3 images
    "shards": [("shard", 2), ("manifest", 2), ("trim", 1)],
}


def run(engine, images, out, fmt, kind, n) -> int:
    proc = subprocess.run([sys.executable, str(DRIVER), str(engine), str(images), str(out), fmt, kind, str(n)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"{kind}@{n} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("kill_images")
    (folder / "sub").mkdir()
    names = sorted(photos)
    for i in range(13):
        photo = photos[names[i % 3]].resize((96 + 8 * i, 72), resample=0).rotate(7 * i)
        photo.save(folder / ("sub" if i % 4 == 0 else ".") / f"img{i:02d}.{'png' if i % 3 else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def reference(engine, images, out, fmt) -> None:
    assert main(["extract", str(images), "--engine", str(engine), "--size", "64", "64", "--out", str(out), "--format",
                 fmt, "--batch-size", "3", "--no-progress"]) == 0


def per_image(out: Path) -> dict:
    return {str(p.relative_to(out)): load_file(str(p)) for p in out.rglob("*.safetensors")}


def manifest_keys(out: Path, fmt: str) -> list[str]:
    """Every key every record of the manifest lists (with repeats, if any)."""
    lines = (out / f"manifest-{fmt}.jsonl").read_text().splitlines()[1:]
    keys = []
    for record in map(json.loads, lines):
        keys += [entry[0] for entry in record.get("files", [])] + record.get("images", [])
    return keys


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
@pytest.mark.parametrize("fmt", sorted(SCHEDULES))
def test_extract_survives_kills(fmt, tiny_onnx, images, tmp_path):
    engine = tiny_onnx["subset"]
    want, cut = tmp_path / "reference", tmp_path / "cut"
    reference(engine, images, want, fmt)
    killed = [run(engine, images, cut, fmt, kind, n) for kind, n in SCHEDULES[fmt]]
    assert killed == [-signal.SIGKILL] * len(killed)  # every kill point was reached
    assert run(engine, images, cut, fmt, "none", 0) == 0

    assert not leftovers(cut)
    keys = manifest_keys(cut, fmt)
    assert len(keys) == len(set(keys)) == 13  # each image recorded once
    manifest = read_manifest(cut, fmt)
    assert [p for p, _ in manifest.failed.values()] == [str(images / "broken.jpg")]
    if fmt == "shards":
        in_files = []
        for shard in cut.glob("shard-*.safetensors"):  # read plainly, without the manifest
            with safe_open(str(shard), framework="np") as f:
                in_files += json.loads(f.metadata()["keys"])
        assert sorted(in_files) == sorted(keys)  # no image in two shards, no shard left unrecorded
        got, ref = dict(read_shards(cut)), dict(read_shards(want))
    else:
        got, ref = per_image(cut), per_image(want)
        assert sorted(got) == sorted(f"{k}.safetensors" for k in keys)
    assert sorted(got) == sorted(ref) and len(got) == 13
    for name in ref:
        assert ref[name].keys() == got[name].keys() == {"us3", "us6"}
        assert all(np.array_equal(ref[name][t], got[name][t]) for t in ref[name]), name
