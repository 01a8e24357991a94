"""Fast-encoder distillation (training.encoder, cleandift-rt distill-encoder) and a student adapted to the encoder
(train --encoder), on the tiny model: the mechanics, not the quality real weights reach."""

from __future__ import annotations

import json

import pytest
import torch

from cleandift_rt.cli.main import main as cli
from cleandift_rt.models import load_student
from cleandift_rt.models.fast_encoder import RECORD_FILE, load_fast_encoder
from cleandift_rt.runs.checkpoints import list_checkpoints
from cleandift_rt.training import Trainer, build_config
from cleandift_rt.training.encoder import EncoderDistillConfig, EncoderDistiller
from cleandift_rt.training.validation import validate
from fast_encoder_fixtures import WIDTH, write_blob_images, write_encoder, write_raw_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 30


def distiller(base, data, out, **kw):
    options = dict(steps=STEPS, batch_size=4, lr=3e-3, crop=64, width=WIDTH, val_images=2, validate_every=10,
                   checkpoint_every=0)
    init, resume, on_step = kw.pop("init", None), kw.pop("resume", None), kw.pop("on_step", None)
    options.update(kw)
    return EncoderDistiller(EncoderDistillConfig(**options), base, data, out, init=init, resume=resume,
                            on_step=on_step, progress=False, log=lambda message: None)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_images(tmp_path_factory.mktemp("blobs"), 10)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_base, blobs):
    out = tmp_path_factory.mktemp("distill") / "enc"
    summary = distiller(tiny_base, blobs, out).run()
    return out, summary


def test_distillation_lowers_the_held_out_latent_error_tenfold(distilled, tiny_base):
    out, summary = distilled
    errors = summary["val_latent_error"]
    assert errors["initial"] / errors["final"] >= 10, errors
    val = [r for r in records(out) if "val_latent_error" in r]
    assert [r["step"] for r in val] == [0, 10, 20, 30]  # at the start, every N steps and at the end
    assert val[0]["val_latent_error"] == errors["initial"] and val[-1]["val_latent_error"] == errors["final"]
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, STEPS + 1))
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["training"]["val_latent_error"] == errors and record["training"]["crop"] == 64
    assert record["base"]["scaling_factor"] == tiny_base.scaling_factor and record["init"] is None
    encoder = load_fast_encoder(out)
    assert record["hash"] == encoder.identity
    assert (out / "checkpoints" / f"step-{STEPS:07d}.safetensors").is_file()


def test_resumed_distillation_matches_an_uninterrupted_one(tiny_base, blobs, tmp_path):
    options = dict(steps=4, batch_size=2, checkpoint_every=2, validate_every=2, keep_checkpoints=3)
    full = distiller(tiny_base, blobs, tmp_path / "full", **options)
    full.run()

    class Interrupted(Exception):
        pass

    def interrupt(step, record):
        if step == 3:  # after the step-2 checkpoint and one step that must be redone
            raise Interrupted

    with pytest.raises(Interrupted):
        distiller(tiny_base, blobs, tmp_path / "cut", on_step=interrupt, **options).run()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-0000002.safetensors"]
    resumed = distiller(tiny_base, blobs, tmp_path / "cut", resume=True, **options)
    assert resumed.step == 2
    resumed.run()
    expected, got = full.encoder.encoder.state_dict(), resumed.encoder.encoder.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "cut")) == strip(records(tmp_path / "full"))
    assert json.loads((tmp_path / "cut" / RECORD_FILE).read_text())["hash"] == \
        json.loads((tmp_path / "full" / RECORD_FILE).read_text())["hash"]
    with pytest.raises(ValueError, match="objective changed .*crop: 64 -> 128"):
        distiller(tiny_base, blobs, tmp_path / "cut", resume=True, **dict(options, crop=128))
    with pytest.raises(ValueError, match="already holds encoder distillation checkpoints"):
        distiller(tiny_base, blobs, tmp_path / "cut", **options)


def test_init_alone_records_public_weights_as_they_are(distilled, tiny_base_dir, blobs, tmp_path, capsys):
    taesd = write_raw_autoencoder(tmp_path / "taesd", distilled[0])  # stands for public TAESD weights
    out = tmp_path / "as-is"
    assert cli(["distill-encoder", "--base", str(tiny_base_dir), "--data", str(blobs), "--out", str(out),
                "--init", str(taesd), "--steps", "0", "--val-images", "2", "--no-progress"]) == 0
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["init"]["name"] == "taesd" and record["hash"] == record["init"]["hash"]
    assert record["training"]["steps"] == 0 and record["decoder"] == "from --init taesd"
    errors = record["training"]["val_latent_error"]
    assert errors["initial"] == errors["final"] < 1
    assert [r["step"] for r in records(out)] == [0] and not list_checkpoints(out / "checkpoints")
    assert "held-out latent error" in capsys.readouterr().out
    assert cli(["info", str(out)]) == 0
    assert "imitates: the VAE of" in capsys.readouterr().out


def test_refusals_are_named(distilled, tiny_base, tiny_base_dir, blobs, tmp_path, capsys):
    unscaled = write_raw_autoencoder(tmp_path / "unscaled", distilled[0], scaling_factor=1 / 0.18215)
    with pytest.raises(ValueError, match="the --init encoder's latents are not this base's: held-out latent error"):
        distiller(tiny_base, blobs, tmp_path / "a", init=unscaled, steps=0, width=None).run()
    assert not (tmp_path / "a" / RECORD_FILE).exists()
    eight = write_raw_autoencoder(tmp_path / "eight", write_encoder(tmp_path / "e", tiny_base, latent_channels=8))
    with pytest.raises(ValueError, match="gives 8 latent channels, the VAE of base .* 4"):
        distiller(tiny_base, blobs, tmp_path / "b", init=eight, width=None)
    with pytest.raises(ValueError, match="without --init there is nothing to record"):
        distiller(tiny_base, blobs, tmp_path / "c", steps=0)
    assert cli(["distill-encoder", "--base", str(tiny_base_dir), "--data", str(blobs), "--out", str(tmp_path / "d"),
                "--init", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "--init encoder folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="too few to hold out 8"):
        distiller(tiny_base, blobs, tmp_path / "f", val_images=8)


def test_adapted_student_beats_the_unadapted_one_on_fast_latents(distilled, tiny_base, tmp_path):
    data = write_blob_images(tmp_path / "data", 6, size=80, seed=1)
    encoder = distilled[0]
    options = dict(steps=16, batch_size=2, size=64, lr=3e-4, warmup_steps=0, validate_every=100, val_images=2,
                   checkpoint_every=0, text_conditioning="none", taps=["us6"])
    quiet = dict(progress=False, log=lambda message: None)
    adapted = Trainer(build_config(overrides=dict(options, encoder=str(encoder))), tiny_base, data,
                      tmp_path / "adapted", **quiet)
    adapted.run()
    plain = Trainer(build_config(overrides=options), tiny_base, data, tmp_path / "plain", **quiet)
    plain.run()  # the same images, batches, timesteps and noise: only the student's latents differ
    fast_latents = adapted.val_set  # the student sees the fast encoder's latents, the teacher the VAE's
    assert fast_latents.student_latents is not None and not torch.equal(fast_latents.student_latents,
                                                                        fast_latents.latents)

    def loss(run):
        val = validate(fast_latents, run.student, run.teacher, run.heads, run.timestep, run.base.alphas_cumprod,
                       (100, 500, 900), 2)
        return -sum(val["mean_projected"].values()) / len(val["mean_projected"])

    assert loss(adapted) < loss(plain), (loss(adapted), loss(plain))
    reference = load_fast_encoder(encoder).reference()
    assert load_student(tmp_path / "adapted" / "student_unet.safetensors").encoder == reference
    assert load_student(tmp_path / "adapted" / "student_full.safetensors").encoder == reference
    assert load_student(tmp_path / "plain" / "student_unet.safetensors").encoder is None
    with pytest.raises(ValueError, match="objective changed .*the latent encoder"):
        Trainer(build_config(overrides=dict(options, steps=17)), tiny_base, data, tmp_path / "adapted",
                resume=True, **quiet)


def test_train_script_takes_the_encoder(distilled, tiny_base_dir, tmp_path):
    from cleandift_rt.cli.train import main as train

    data = write_blob_images(tmp_path / "data", 2, size=64, seed=2)
    summary = train(["--base", str(tiny_base_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                     "--batch-size", "1", "--size", "64", "--no-captions", "--encoder", str(distilled[0]),
                     "--no-progress", "validate_every=0", "warmup_steps=0"])
    assert summary["encoder"] == load_fast_encoder(distilled[0]).reference()
