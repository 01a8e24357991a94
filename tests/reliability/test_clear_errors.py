"""Issue 29, class 8: raw library errors replaced by clear ones, each example of the issue.

Every case ends in a ValueError / TypeError / FileNotFoundError that names the problem and the fix
(or, on the command line, one ``error:`` line and exit status 2), never a pybind11 signature dump,
a hub error, a bare ``JSONDecodeError``, ``NotImplementedError`` or ``AssertionError``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift_rt import Engine
from cleandift_rt.cli.main import main
from cleandift_rt.cli.train import entry as train_entry
from cleandift_rt.features.preprocess import load_image, rgb8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("photo") / "cat.png"
    photos["cat"].resize((96, 80)).save(path)
    return path


def test_an_absurd_thread_count_is_named_not_a_signature_dump(tiny_onnx):
    with pytest.raises(ValueError, match=r"threads .* must be in \[1, 1024\], got 1000000000000"):
        Engine(tiny_onnx["subset"], threads=10**12)


def test_a_base_folder_without_its_tokenizer_is_named(tiny_base_dir, tmp_path):
    from cleandift_rt.models import load_base

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    shutil.rmtree(base / "tokenizer")
    with pytest.raises(ValueError, match="has text_encoder/ but no tokenizer/ folder"):
        load_base(base)


def test_json_errors_name_the_file(tmp_path, tiny_onnx, photo, capsys):
    from cleandift_rt.evaluation.pairs import load_pairs_json
    from cleandift_rt.training import build_config

    bad = tmp_path / "broken.json"
    bad.write_text('{"pairs": [1, 2,')
    for read in (lambda: load_pairs_json(bad), lambda: build_config(config_file=bad)):
        with pytest.raises(ValueError, match=r"broken.json is not valid JSON \(.* at line 1, column \d+\)"):
            read()
    assert main(["match", str(photo), str(photo), "--engine", str(tiny_onnx["subset"]), "--size", "64",
                 "--points", str(bad), "--out", str(tmp_path / "m.png")]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err


def test_a_tensor_on_the_meta_device_is_named(subset_engine):
    with pytest.raises(ValueError, match="meta device"):
        subset_engine.extract(torch.empty(1, 3, 64, 64, device="meta"))


def test_a_pil_image_whose_file_was_closed_is_named(subset_engine, photo):
    with Image.open(photo) as image:
        pass  # closed before its pixels were loaded
    with pytest.raises(ValueError, match=r"file was closed before the pixels were loaded; call image.load\(\)"):
        subset_engine.extract([image])


def test_an_empty_onnx_file_is_called_empty(tmp_path):
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.onnx is empty \(0 bytes\)"):
        Engine(empty)


def test_a_nan_point_is_called_nan(tiny_onnx, photo, tmp_path, capsys):
    assert main(["match", str(photo), str(photo), "--engine", str(tiny_onnx["subset"]), "--size", "64",
                 "--points", "nan,3 4,5", "--out", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "contains NaN or Inf" in err and "outside" not in err


def test_a_fifo_and_a_dangling_link_named_like_images_are_named_and_counted(subset_engine, photo, tmp_path):
    from cleandift_rt.extraction import collect_images, extract_local

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photo, folder / "good.png")
    os.mkfifo(folder / "x.jpg")
    os.symlink(folder / "gone.png", folder / "link.png")
    with pytest.raises(ValueError, match="x.jpg is a FIFO, not a regular file"):
        load_image(folder / "x.jpg")
    with pytest.raises(FileNotFoundError, match="link.png is a symbolic link to .*gone.png, which does not exist"):
        load_image(folder / "link.png")
    summary = extract_local(subset_engine, collect_images([folder]), tmp_path / "out", progress=False,
                            log=lambda *_: None)
    failed = {os.path.basename(p): why for p, why in summary.failed}
    assert summary.done == 1 and sorted(failed) == ["link.png", "x.jpg"]  # counted, never skipped silently
    assert "FIFO" in failed["x.jpg"] and "does not exist" in failed["link.png"]


def test_an_infinite_learning_rate_is_refused_before_any_model_loads(tmp_path, capsys):
    assert train_entry(["--base", str(tmp_path / "no_base"), "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                        "--lr", "inf"]) == 2
    err = capsys.readouterr().err
    assert "lr must be finite (not NaN or Inf), got inf" in err and "timestep" not in err


def test_caption_files_and_config_fields_are_named(tmp_path):
    from cleandift_rt.training import build_config
    from cleandift_rt.training.data import read_caption

    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"caption file .*a.txt is not UTF-8 text"):
        read_caption(image)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "a.json").write_bytes(b'{"caption": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"caption file .*a.json is not UTF-8 text"):
        read_caption(image)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"steps": "abc"}))
    with pytest.raises(TypeError, match=r"c.json: steps must be an integer, got str 'abc'"):
        build_config(config_file=config)


def test_mode_i_images_holding_8_bit_values_are_read_as_8_bit(tmp_path):
    grey = np.tile(np.arange(256, dtype=np.int32), (64, 1))
    rgb = np.asarray(rgb8(Image.fromarray(grey)))  # mode I, as convert("I") of an 8-bit image makes
    assert Image.fromarray(grey).mode == "I" and np.array_equal(rgb[..., 0], grey.astype(np.uint8))
    sixteen = np.asarray(rgb8(Image.fromarray(grey * 257)))  # 0..65535: still scaled as 16-bit
    assert np.array_equal(sixteen[..., 0], grey.astype(np.uint8))
    path = tmp_path / "grey.tif"
    Image.fromarray(grey).save(path)
    assert np.array_equal(np.asarray(load_image(path))[..., 1], grey.astype(np.uint8))
