"""Robot-DIFT encoder packages: the engine against an independent transcription of the package's extraction
(PyTorch backend and through the ONNX export), the latent choice of "sample" packages, and every refusal."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from cleandift_rt import Engine
from cleandift_rt.cli.main import main as cli_main
from cleandift_rt.export.onnx_export import export_onnx
from cleandift_rt.models.robot_dift import load_robot_dift
from robot_package import TAPS, student_unet, transcribed_features, write_package

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["insert the pin", "open the drawer"]


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_engine_is_the_package_math(robot_engine, robot_package, tiny_base_dir, pixels):
    assert robot_engine.taps == TAPS and robot_engine.info["extra"]["robot_dift"]["timestep"] == 217.5
    got = robot_engine.extract(pixels, prompt=PROMPTS)
    want, _ = transcribed_features(tiny_base_dir, robot_package, pixels, PROMPTS)
    for tap in TAPS:
        assert got[tap].shape == want[tap].shape
        assert (got[tap] - want[tap]).abs().max() <= 1e-5, tap
    # one instruction for the batch; each distinct text encoded once and kept
    shared = robot_engine.extract(pixels, prompt=PROMPTS[0], taps=["us6"])["us6"]
    torch.testing.assert_close(shared[0], got["us6"][0], rtol=0, atol=1e-5)
    assert set(PROMPTS) <= set(robot_engine.backend.base._prompt_cache)
    default, _ = transcribed_features(tiny_base_dir, robot_package, pixels[:1], [""])
    torch.testing.assert_close(robot_engine.extract(pixels[:1], taps=["us8"])["us8"], default["us8"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one text or a list of 2"):
        robot_engine.extract(pixels, prompt=["only one"])
    with pytest.raises(ValueError, match="not both"):
        robot_engine.extract(pixels, prompt="x", prompt_embeds=torch.zeros(77, 32))


def test_sample_packages_run_only_as_asked(tmp_path, tiny_base, tiny_base_dir, pixels):
    package = write_package(tmp_path / "sampled", student_unet(tiny_base.unet), metadata={"vae_latent_mode": None})
    base = str(tiny_base_dir)
    with pytest.raises(ValueError, match="trained on posterior samples"):
        Engine(package, base=base)
    with pytest.raises(ValueError, match="needs seed"):
        Engine(package, base=base, latent="sample")
    engine = Engine(package, base=base, size=(64, 64), latent="sample", seed=7)
    got = engine.extract(pixels, prompt=PROMPTS)
    want, _ = transcribed_features(tiny_base_dir, package, pixels, PROMPTS, seed=7)
    for tap in TAPS:
        assert (got[tap] - want[tap]).abs().max() <= 1e-5, tap
    # one draw per seed, shared by the images: features do not depend on the batch
    torch.testing.assert_close(engine.extract(pixels[1:], prompt=PROMPTS[1])["us6"], got["us6"][1:], rtol=0, atol=1e-5)
    mode = Engine(package, base=base, size=(64, 64), latent="mode").extract(pixels, prompt=PROMPTS)
    want_mode, _ = transcribed_features(tiny_base_dir, package, pixels, PROMPTS)
    assert (mode["us3"] - want_mode["us3"]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="posterior mode only"):
        export_onnx(str(package), base, tmp_path / "s.onnx", size=(64, 64), latent="sample", log=lambda *a: None)
    with pytest.raises(ValueError, match="Robot-DIFT package folders"):
        Engine(tiny_base_dir, latent="mode")


def test_onnx_export_takes_the_instruction_as_embeddings(robot_package, tiny_base_dir, tmp_path, pixels):
    out = tmp_path / "robot.onnx"
    assert cli_main(["export-onnx", "--student", str(robot_package), "--base", str(tiny_base_dir), "--out", str(out),
                     "--size", "64", "--taps", *TAPS]) == 0
    engine = Engine(out, precision="fp32")  # the reference path (None may pick OpenVINO bf16)
    assert engine.taps == TAPS and engine.info["extra"]["robot_dift"]["latent"] == "mode"
    want, embeds = transcribed_features(tiny_base_dir, robot_package, pixels, PROMPTS)
    got = engine.extract(pixels, prompt_embeds=embeds)
    for tap in TAPS:
        a, b = got[tap].flatten(1).double(), want[tap].flatten(1).double()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert cosine.min() >= 1 - 1e-5 and (a - b).abs().max() <= 5e-4 * b.abs().max(), tap  # ORT vs eager fp32
    with pytest.raises(ValueError, match="pass prompt_embeds"):
        engine.extract(pixels, prompt="insert the pin")


def bad_timestep(path, value):
    torch.save(value, path / "timestep.bin")


class RunsCode:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


@pytest.mark.parametrize("change, error", [
    (dict(metadata={"model_type": "dift"}), "not 'cleandift'"),
    (dict(metadata={"sd_version": "sd15"}), "sd_version"),
    (dict(metadata={"use_text_condition": "yes"}), "true or false"),
    (dict(metadata={"vae_latent_mode": "mean"}), "'mode' or 'sample'"),
    (dict(metadata={"components": {"student_unet": "../unet"}}), "plain sub-folder"),
    (dict(metadata={"components": {"student_unet": "weights"}}), "weights/ .* is missing"),
    (dict(drop=("components",)), "components.student_unet"),
    (dict(metadata={"feature_dims": {"us6": 999}}), "feature_dims disagree"),
    (dict(metadata={"feature_dims": {"us42": 64}}), "unknown taps"),
    (dict(timestep={"timestep": torch.tensor(float("nan"))}), "not a finite number"),
    (dict(timestep={"timestep": torch.tensor([1.0, 2.0])}), "one number"),
    (dict(timestep={"timestep": torch.tensor(3.0), "seed": 1}), "exactly"),
    (dict(timestep={"t": torch.tensor(3.0)}), "exactly"),
    (dict(timestep="pickle"), "not a plain torch.save"),
    (dict(timestep=None), "no timestep.bin"),
    (dict(weights="diffusion_pytorch_model.bin"), "allow_pickle=True"),
    (dict(weights="two"), "exactly one"),
    (dict(weights="none"), "none of"),
])
def test_packages_that_do_not_fit_are_refused_by_name(tmp_path, tiny_base, change, error, capsys):
    unet = tiny_base.unet
    weights = change.get("weights", "diffusion_pytorch_model.safetensors")
    folder = write_package(tmp_path / "pkg", unet, metadata=change.get("metadata"), drop=change.get("drop", ()),
                           weights="model.safetensors" if weights in ("two", "none") else weights)
    if weights == "two":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes((folder / "unet" / "model.safetensors")
                                                                              .read_bytes())
    if weights == "none":
        (folder / "unet" / "model.safetensors").unlink()
    if "timestep" in change:
        if change["timestep"] is None:
            (folder / "timestep.bin").unlink()
        elif change["timestep"] == "pickle":
            (folder / "timestep.bin").write_bytes(pickle.dumps({"timestep": RunsCode()}, protocol=2))
        else:
            bad_timestep(folder, change["timestep"])
    with pytest.raises(ValueError, match=error):
        load_robot_dift(folder, tiny_base)
    assert "ran code" not in capsys.readouterr().out


def test_bin_weights_load_when_allowed(tmp_path, tiny_base, robot_package):
    reference = load_robot_dift(robot_package, tiny_base)
    folder = write_package(tmp_path / "bin", reference.student.unet, weights="diffusion_pytorch_model.bin")
    package = load_robot_dift(folder, tiny_base, allow_pickle=True)
    for (name, a), (_, b) in zip(package.student.unet.state_dict().items(), reference.student.unet.state_dict().items()):
        assert torch.equal(a, b), name
    meta = json.loads((folder / "metadata.json").read_text())
    assert package.feature_dims == meta["feature_dims"] and np.isclose(package.student.timestep, 217.5)
