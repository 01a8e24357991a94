"""Issue 29, class 7: faults that used to end a whole run or leave debris.

A full disk ends ``extract`` with one line saying that rerunning resumes (and it does); an image
whose output name the file system refuses is listed as failed while the rest are done; a killed
export's staging folder is removed by the next one; ``--summary`` naming a folder is refused
before any work; an export's external-data file gets the graph's permissions.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cleandift_rt.checkpoint import _UMASK, staging_folder
from cleandift_rt.cli.main import main
from cleandift_rt.export.onnx_export import save_onnx
from cleandift_rt.extraction import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("faults_in")
    for i, name in enumerate(sorted(photos) * 2):
        photos[name].resize((96 + 8 * i, 72)).save(folder / f"img{i}.png")
    return folder


def _extract(engine, images, out, fmt, *extra):
    return main(["extract", str(images), "--engine", str(engine), "--size", "64", "--out", str(out), "--format", fmt,
                 "--batch-size", "2", "--shard-images", "2", "--workers", "1", "--no-progress", *extra])


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "shards"])
def test_a_full_disk_ends_with_one_line_and_the_rerun_completes(tiny_onnx, images, tmp_path, monkeypatch, capsys,
                                                               fmt):
    import safetensors.numpy
    from safetensors import SafetensorError

    real_save, real_savez, writes = safetensors.numpy.save_file, np.savez, []

    def full(*args, **kwargs):
        if len(writes) == 2:  # the third write finds the disk full, as safetensors and numpy report it
            if fmt == "npz":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        writes.append(1)
        return (real_savez if fmt == "npz" else real_save)(*args, **kwargs)

    monkeypatch.setattr(np if fmt == "npz" else safetensors.numpy, "savez" if fmt == "npz" else "save_file", full)
    out = tmp_path / "out"
    assert _extract(tiny_onnx["subset"], images, out, fmt) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is full" in err and "rerun the same command" in err, err
    monkeypatch.undo()
    assert _extract(tiny_onnx["subset"], images, out, fmt) == 0
    manifest = read_manifest(out, fmt)
    assert sorted(manifest.done) == sorted(p.name for p in images.iterdir()) and not manifest.failed
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_an_image_whose_output_name_is_too_long_is_listed_and_the_rest_done(tiny_onnx, images, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted(images.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    long_name = "a" * 245 + ".png"  # a valid name; its output, + ".safetensors", is not
    (folder / long_name).write_bytes((images / "img0.png").read_bytes())
    assert _extract(tiny_onnx["subset"], folder, tmp_path / "out", "safetensors") == 0
    printed = capsys.readouterr().out
    assert "wrote 3 feature file(s)" in printed and "skipped 1 unreadable image(s)" in printed
    assert "output name (261 bytes with the suffix) is too long for the file system" in printed
    assert _extract(tiny_onnx["subset"], folder, tmp_path / "shards", "shards") == 0  # shards keep names inside
    assert len(read_manifest(tmp_path / "shards", "shards").done) == 4


KILLED = """
import os, signal, sys
from cleandift_rt.checkpoint import staging_folder
with staging_folder(sys.argv[1], "export"), staging_folder(sys.argv[1], "save"):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _small_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 128, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 128, 128])
    weight = numpy_helper.from_array(np.ones((3, 128, 128), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_killed_exports_staging_is_removed_by_the_next_and_modes_match(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    stale = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert stale == [".export", ".save"]  # what the kill left
    with staging_folder(tmp_path, "export"):  # the next export
        pass
    save_onnx(_small_model(), tmp_path / "m.onnx", external_data=True)  # the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"m.onnx": 0o666 & ~_UMASK, "m.onnx.data": 0o666 & ~_UMASK}
    assert onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0].name == "w"


def test_a_live_or_foreign_staging_folder_is_left_alone(tmp_path):
    live = tmp_path / f".export-elsewhere-{os.getpid()}-abcdefgh"
    mine_alive = None
    live.mkdir()
    with staging_folder(tmp_path, "export") as mine_alive:
        with staging_folder(tmp_path, "export"):  # a second export beside a running one
            assert mine_alive.is_dir()
    assert live.is_dir()  # another machine's (a shared folder): never judged from here


def test_summary_naming_a_folder_is_refused_before_any_work(tiny_onnx, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _extract(tiny_onnx["subset"], images, out, "safetensors", "--summary", str(tmp_path)) == 2
    assert "--summary" in capsys.readouterr().err and not out.exists()
    assert _extract(tiny_onnx["subset"], images, out, "safetensors", "--summary", str(tmp_path / "s.json")) == 0
    assert json.loads((tmp_path / "s.json").read_text())["done"] == len(list(images.iterdir()))
    assert Path(out).is_dir()
