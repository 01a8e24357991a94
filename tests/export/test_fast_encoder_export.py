"""A fast encoder in place of the VAE encoder: the ONNX export (export_onnx.py --encoder), the PyTorch Engine
(encoder=DIR), their parity, what the metadata and `info` say, and the warnings and refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cleandift_rt import Engine
from cleandift_rt.cli.main import main as cli
from cleandift_rt.formats import describe
from cleandift_rt.models import save_student_unet
from cleandift_rt.models.fast_encoder import load_fast_encoder
from export_fixtures import _export_cli, cosine
from fast_encoder_fixtures import write_encoder

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


@pytest.fixture(scope="module")
def fast(tmp_path_factory, tiny_base, tiny_base_dir, tiny_student_files):
    """{'encoder': folder, 'onnx': the tiny student exported with it, 'warning': what the export said}."""
    folder = tmp_path_factory.mktemp("fast")
    encoder = write_encoder(folder / "enc", tiny_base)
    out = folder / "fast.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _export_cli().main(["--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir),
                                   "--out", str(out), "--size", str(SIZE), "--encoder", str(encoder)]) == 0
    return {"encoder": encoder, "onnx": out, "warnings": [str(w.message) for w in caught]}


def test_export_matches_the_pytorch_engine_per_tap(fast, tiny_student_files, tiny_base_dir, batch):
    graph = Engine(fast["onnx"], backend="onnxruntime", precision="fp32")
    with pytest.warns(UserWarning, match="runs on fast encoder enc"):
        eager = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), encoder=fast["encoder"], size=(SIZE, SIZE))
    ours, want = graph.extract(batch), eager.extract(batch)
    assert set(ours) == set(want) and len(ours) == 11
    for tap in want:
        assert cosine(ours[tap], want[tap]).min() >= 0.99999, tap
    vae = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(SIZE, SIZE)).extract(batch)
    assert not np.allclose(vae["us6"], want["us6"], atol=1e-3)  # the encoder really replaced the VAE's
    record = graph.info["encoder"]
    assert record == eager.info["encoder"] and record["hash"] == load_fast_encoder(fast["encoder"]).identity


def test_metadata_and_info_name_the_encoder(fast, capsys):
    record = describe(fast["onnx"])["encoder"]
    encoder = load_fast_encoder(fast["encoder"])
    assert record["name"] == "enc" and record["hash"] == encoder.identity and record["architecture"] == "AutoencoderTiny"
    assert record["imitates"]["scaling_factor"] == 0.18215
    assert any("was trained on latents of the base VAE's encoder but runs on fast encoder enc" in w
               for w in fast["warnings"])
    assert cli(["info", str(fast["onnx"])]) == 0
    assert f"encoder: fast encoder enc (AutoencoderTiny, {record['parameters']:,} parameters, hash {encoder.identity})" \
        in capsys.readouterr().out


def test_the_engine_warns_about_a_student_on_another_encoder(fast, tiny_student, tiny_base_dir, tmp_path, capsys):
    reference = load_fast_encoder(fast["encoder"]).reference()
    adapted = tmp_path / "adapted_unet.safetensors"
    save_student_unet(adapted, tiny_student.unet, tiny_student.timestep, encoder=reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own encoder: no warning
        Engine(adapted, base=str(tiny_base_dir), encoder=fast["encoder"], size=(SIZE, SIZE))
    with pytest.warns(UserWarning, match=f"trained on latents of fast encoder enc \\({reference['hash'][:12]}\\) but "
                      "runs on the base VAE's encoder"):
        info = Engine(adapted, base=str(tiny_base_dir), size=(SIZE, SIZE)).info
    assert info["encoder"] is None
    assert describe(adapted)["adapted_encoder"] == reference
    assert cli(["info", str(adapted)]) == 0
    assert f"adapted to encoder: enc (hash {reference['hash']})" in capsys.readouterr().out


def test_refusals(fast, tiny_student_files, tiny_base_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="has its encoder in the graph: export the student with --encoder DIR"):
        Engine(fast["onnx"], encoder=fast["encoder"])
    with pytest.raises(FileNotFoundError, match="fast encoder folder .*missing does not exist"):
        Engine(tiny_student_files["unet"], base=str(tiny_base_dir), encoder=tmp_path / "missing")
    out = tmp_path / "x.onnx"
    assert _export_cli().main(["--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir),
                               "--out", str(out), "--encoder", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err and not out.exists()


def test_compare_is_the_first_check_of_a_fast_encoder(fast, tiny_student_files, tiny_base_dir, tmp_path, capsys):
    from cleandift_rt.assets import PHOTOS, load_photo

    images = tmp_path / "photos"
    images.mkdir()
    for name in PHOTOS:
        load_photo(name).resize((SIZE, SIZE)).save(images / f"{name}.png")
    student = str(tiny_student_files["unet"])
    with pytest.warns(UserWarning, match="runs on fast encoder enc"):
        assert cli(["compare", student, student, "--base", str(tiny_base_dir), "--b-encoder", str(fast["encoder"]),
                    "--images", str(images), "--taps", "us6", "--size", str(SIZE), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "us6" in report and "match agree" in report


def test_untrusted_encoder_records_are_refused(fast, tiny_student, tmp_path):
    from cleandift_rt.checkpoint import read_safetensors, read_safetensors_metadata, write_safetensors
    from cleandift_rt.formats.artifact import ArtifactInfo, read_onnx_info
    from cleandift_rt.models import load_student

    good = read_onnx_info(fast["onnx"]).to_dict()
    assert ArtifactInfo.from_dict(good, "x.onnx").encoder == good["encoder"]
    for change, message in (({"hash": "../../etc"}, "not a hex digest"), ({"kind": "vae"}, "of kind 'vae'"),
                            ({"parameters": -1}, "parameters -1 must be a positive integer"),
                            ({"val_latent_error": float("nan")}, "val_latent_error nan")):
        with pytest.raises(ValueError, match=message):
            ArtifactInfo.from_dict(dict(good, encoder={**good["encoder"], **change}), "x.onnx")
    path = tmp_path / "s.safetensors"
    save_student_unet(path, tiny_student.unet, tiny_student.timestep)
    meta = {**read_safetensors_metadata(path), "encoder": '{"name": "e", "hash": 7}'}
    write_safetensors(path, read_safetensors(path), meta)
    with pytest.raises(ValueError, match="its encoder: the encoder hash 7 is not a hex digest"):
        load_student(path)
