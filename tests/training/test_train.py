"""CleanDIFT training on the tiny model (CPU, 64 px images: every tap exists, steps take a fraction of a second)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleandift_rt.models import load_student
from cleandift_rt.taps import TAP_TABLE, TAPS
from cleandift_rt.training import Trainer, build_config, distillation_step, stratified_timesteps
from cleandift_rt.training.config import PRESETS, parse_override
from cleandift_rt.training.data import ImageFolder
from cleandift_rt.runs.checkpoints import list_checkpoints

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder, count, captions="json", size=(80, 96), start=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    for i in range(start, start + count):
        rgb = np.stack([(x * (i + 2)) % 256, (y * (3 + 2 * i)) % 256, ((x + y) * (i + 1)) % 256], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
        if captions == "json":
            (folder / f"img{i}.json").write_text(json.dumps({"caption": f"a pattern number {i}"}))
        elif captions == "txt":
            (folder / f"img{i}.txt").write_text(f"stripes {i}\n")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_data")
    write_images(folder, 4, "json")
    write_images(folder, 2, "txt", start=4)
    return folder


def config(**overrides):
    values = dict(steps=4, batch_size=2, size=SIZE, validate_every=0, checkpoint_every=0, lr=1e-4, warmup_steps=2)
    values.update(overrides)
    return build_config(overrides=values)


def trainer(cfg, base, data, out, **kw):
    return Trainer(cfg, base, data, out, progress=False, log=lambda msg: None, **kw)


# ---------------------------------------------------------------------------------------------
# objective


def test_stratified_timesteps_cover_one_stratum_each():
    t = stratified_timesteps(4000, 3, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4000, 3)
    edges = [1 + i * 998 / 3 for i in range(4)]
    for i in range(3):
        assert edges[i] - 1 < t[:, i].min() and t[:, i].max() < edges[i + 1]
    assert int(t.min()) == 1 and int(t.max()) == 998  # floor(1 + (i + u) * 998 / I) reaches both ends


def test_loss_options():
    from cleandift_rt.training.objective import tap_loss

    a, b = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    assert float(tap_loss(a, b, "cosine")) == pytest.approx(-float(F.cosine_similarity(a, b, dim=1).mean()), abs=1e-6)
    assert float(tap_loss(a, 2 * a, "cosine")) == pytest.approx(-1.0, abs=1e-6)  # scale-invariant
    assert float(tap_loss(a, b, "mse")) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    assert float(tap_loss(a, b, "l1")) == pytest.approx(float((a - b).abs().mean()), rel=1e-6)


def _tap_outputs(unet, sample, timestep, text):
    """Every tap from a full forward with plain hooks (independent of unet_taps' early stop)."""
    got = {}
    handles = [unet.get_submodule(TAP_TABLE[n].module).register_forward_hook(
        lambda m, i, o, n=n: got.__setitem__(n, o if torch.is_tensor(o) else o[0])) for n in TAPS]
    with torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=text)
    for h in handles:
        h.remove()
    return got


def test_first_loss_is_minus_sum_of_tap_cosines(tiny_base):
    """Identity heads at init: the loss is -sum_k mean cos(student_k(x0), teacher_k(x_t)), recomputed here
    with plain forward hooks on full forwards, the student run per row (as the release does) and the
    diffusers scheduler's add_noise."""
    from diffusers import DDPMScheduler
    import copy

    from cleandift_rt.models.heads import build_heads

    torch.manual_seed(0)
    student = copy.deepcopy(tiny_base.unet)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02 * (p.abs().mean() + 1e-3))
    heads = build_heads(tiny_base.block_out_channels)
    feats = torch.randn(2, 64, 4, 4)
    assert torch.equal(heads("us6", feats, torch.tensor([10, 900])), feats)  # identity at init

    timestep = torch.nn.Parameter(torch.tensor(261.0))
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = tiny_base.encode_prompt(["a cat", "a dog"])
    out = distillation_step(student, tiny_base.unet, heads, timestep, x0, cond, tiny_base.alphas_cumprod, 3,
                            torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    u = torch.rand(2, 3, generator=gen)
    t = torch.floor(1 + (torch.arange(3) + u) * 998 / 3).long().reshape(-1)
    noise = torch.randn(6, 4, 8, 8, generator=gen)
    x_t = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").add_noise(x0.repeat_interleave(3, 0), noise, t)

    teacher = _tap_outputs(tiny_base.unet, x_t, t, cond.repeat_interleave(3, 0))
    stud = _tap_outputs(student, x0.repeat_interleave(3, 0), torch.full((6,), 261.0), cond.repeat_interleave(3, 0))
    expected = -sum(F.cosine_similarity(stud[n], teacher[n], dim=1).mean() for n in TAPS)
    assert float(out.loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    assert out.timesteps.reshape(-1).tolist() == t.tolist()
    assert sum(out.cosine.values()) == pytest.approx(-float(out.loss.detach()), abs=1e-5)
    # the student timestep is learnable: it gets a gradient through the U-Net's time embedding
    out.loss.backward()
    assert timestep.grad is not None and torch.isfinite(timestep.grad)


# ---------------------------------------------------------------------------------------------
# training runs


def test_loss_falls_within_fifty_steps(tiny_base_dir, data_dir, tmp_path):
    tr = trainer(config(steps=25, lr=3e-4, warmup_steps=0, checkpoint_every=0), tiny_base_dir, data_dir, tmp_path)
    tr.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 26))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert all(-len(TAPS) <= loss <= len(TAPS) for loss in losses)


def _trainable(tr):
    return {name: p.detach().clone() for name, p in tr.named_params}


def test_resumed_run_matches_uninterrupted_run(tiny_base_dir, data_dir, tmp_path):
    cfg = dict(steps=4, batch_size=1, grad_accum=2, checkpoint_every=2, keep_checkpoints=5,
               validate_every=2, val_images=1)
    full = trainer(config(**cfg), tiny_base_dir, data_dir, tmp_path / "full")
    full.run()

    class Interrupted(Exception):
        pass

    def interrupt(step, record):
        if step == 3:  # after the step-2 checkpoint and one more step that must be redone
            raise Interrupted

    with pytest.raises(Interrupted):
        trainer(config(**cfg), tiny_base_dir, data_dir, tmp_path / "cut", on_step=interrupt).run()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-0000002.safetensors"]
    resumed = trainer(config(**cfg), tiny_base_dir, data_dir, tmp_path / "cut", resume=True)
    assert resumed.step == 2
    resumed.run()

    expected, got = _trainable(full), _trainable(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.timestep.item() != 261.0  # the learnable timestep moved and was restored exactly
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref]
    assert lines[3]["val"] == ref[3]["val"] and set(ref[3]["val"]["mean_projected"]) == {"100", "261", "500", "900"}
    with pytest.raises(ValueError, match="objective changed"):
        trainer(config(**dict(cfg, timesteps_per_image=2)), tiny_base_dir, data_dir, tmp_path / "cut", resume=True)
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        trainer(config(**cfg), tiny_base_dir, data_dir, tmp_path / "cut")


def test_crash_while_writing_checkpoint_keeps_previous(tiny_base_dir, data_dir, tmp_path, monkeypatch):
    import safetensors.torch

    tr = trainer(config(steps=4, checkpoint_every=1, keep_checkpoints=1), tiny_base_dir, data_dir, tmp_path)
    real_save = safetensors.torch.save_file
    calls = []

    def crashing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint: half a file, then the process "dies"
            with open(filename, "wb") as f:
                f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        tr.run()
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    ckpt_dir = tmp_path / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-0000001.safetensors"]  # no temp file left behind
    assert trainer(config(steps=4), tiny_base_dir, data_dir, tmp_path, resume=True).step == 1

    # a newest checkpoint damaged some other way (copied half, not via our atomic write): fall back to the previous
    (ckpt_dir / "step-0000002.safetensors").write_bytes(b"\x80\x04garbage")
    messages = []
    tr = Trainer(config(steps=4), tiny_base_dir, data_dir, tmp_path, resume=True, progress=False, log=messages.append)
    assert tr.step == 1 and any("skipping unreadable checkpoint step-0000002" in m for m in messages)


def test_cli_writes_release_files_that_load(tiny_base_dir, data_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cleandift_rt.cli.train import main

    out = tmp_path / "run"
    summary = main(["--base", str(tiny_base_dir), "--data", str(data_dir), "--out", str(out), "--steps", "2",
                    "--batch-size", "2", "--size", str(SIZE), "--no-progress", "lr=1e-4", "warmup_steps=0",
                    "validate_every=0"])
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(isinstance(r["loss"], float) for r in records)

    state = load_file(out / "student_unet.safetensors")
    with safe_open(str(out / "student_unet.safetensors"), "pt") as f:
        unet_config = json.loads(f.metadata()["unet_config"])
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(state, strict=True)  # diffusers keys, nothing missing or extra

    student = load_student(out / "student_full.safetensors")
    assert student.heads is not None and set(student.heads.taps) == set(TAPS)
    assert student.timestep == pytest.approx(summary["timestep"]) and student.timestep != 261.0
    for k, v in student.unet.state_dict().items():
        assert torch.equal(v, state[k]), k
    base_w = load_file(tiny_base_dir / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert not torch.equal(state["conv_in.weight"], base_w)  # the student was trained
    assert (out / "checkpoints" / "step-0000002.safetensors").is_file()


def test_lora_student_merges_into_plain_unet(tiny_base, data_dir, tmp_path):
    from cleandift_rt.features.capture import unet_taps
    from cleandift_rt.training.trainer import plain_unet

    tr = trainer(config(steps=1, lora_rank=4, lr=1e-2, warmup_steps=0), tiny_base, data_dir, tmp_path)
    names = [n for n, _ in tr.named_params if n.startswith("student.")]
    assert names and all("lora_" in n for n in names)
    tr.run()
    merged = plain_unet(tr.student)
    assert merged is not tr.student and not any("lora" in k for k in merged.state_dict())
    x, cond = torch.randn(1, 4, 8, 8), tiny_base.encode_prompt([""])
    with torch.no_grad():
        a = unet_taps(tr.student, x, 261.0, cond, ["us6"])["us6"]
        b = unet_taps(merged, x, 261.0, cond, ["us6"])["us6"]
        c = unet_taps(tiny_base.unet, x, 261.0, cond, ["us6"])["us6"]
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-4)
    assert load_student(tmp_path / "student_unet.safetensors").unet is not None


def test_gradient_checkpointing_and_bf16_train(tiny_base, data_dir, tmp_path):
    plain = trainer(config(steps=1), tiny_base, data_dir, tmp_path / "a")
    ckpt = trainer(config(steps=1, gradient_checkpointing=True), tiny_base, data_dir, tmp_path / "b")
    ra, rb = plain.train_step(), ckpt.train_step()
    assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    for (name, p), (_, q) in zip(plain.named_params, ckpt.named_params):
        assert torch.allclose(p, q, atol=1e-6), name
    bf16 = trainer(config(steps=1, bf16=True), tiny_base, data_dir, tmp_path / "c")
    rc = bf16.train_step()
    assert rc["loss"] == pytest.approx(ra["loss"], abs=0.05)


# ---------------------------------------------------------------------------------------------
# data and configuration errors


def test_bad_data_folders_give_clear_messages(tiny_base_dir, tmp_path, capsys):
    from cleandift_rt.cli.train import entry

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(empty)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")

    uncaptioned = write_images(tmp_path / "uncaptioned", 3, captions=None)
    with pytest.raises(ValueError, match=r"3 of 3 images .* have no caption.*--no-captions"):
        ImageFolder(uncaptioned)
    assert [s.caption for s in ImageFolder(uncaptioned, captions=False).samples] == ["", "", ""]
    (uncaptioned / "img0.json").write_text("{\"text\": \"wrong field\"}")
    with pytest.raises(ValueError, match="no string field \"caption\""):
        ImageFolder(uncaptioned)

    mixed = write_images(tmp_path / "mixed", 2)
    (mixed / "broken.jpg").write_bytes(b"not a jpeg at all")
    (mixed / "broken.json").write_text(json.dumps({"caption": "x"}))
    write_images(mixed, 1, size=(40, 200), start=7)  # too small: 40 px side
    folder = ImageFolder(mixed)
    assert len(folder) == 2 and folder.skipped.counts == {"unreadable": 1, "too small": 1}
    assert "broken.jpg" in folder.skipped.summary() and "img7.png" in folder.skipped.summary()

    hopeless = tmp_path / "hopeless"
    hopeless.mkdir()
    (hopeless / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"no usable images .* 1 unreadable"):
        ImageFolder(hopeless, captions=False)

    code = entry(["--base", str(tiny_base_dir), "--data", str(empty), "--out", str(tmp_path / "o"), "--steps", "1",
                  "--batch-size", "1", "--size", str(SIZE), "--no-progress"])
    assert code == 2 and "holds no images" in capsys.readouterr().err


def test_truncated_image_is_skipped_during_training(tiny_base, tmp_path):
    data = write_images(tmp_path / "data", 3)
    good = (data / "img0.png").read_bytes()
    (data / "img0.png").write_bytes(good[: len(good) // 3])  # header fine, pixels missing
    tr = trainer(config(steps=2, batch_size=2), tiny_base, data, tmp_path / "out")
    summary = tr.run()
    assert summary["skipped"]["counts"] == {"unreadable": 1}
    assert summary["images"] == 3  # the header scan accepted it; decoding rejected it once, and only once


def test_config_presets_and_overrides(tmp_path):
    assert build_config().lr == 2e-6 and build_config().batch_size == 8 and build_config().steps == 400
    assert build_config().timesteps_per_image == 3 and build_config().student_timestep == 261.0
    release = build_config("release")
    assert release.lr == PRESETS["release"]["lr"] == 1e-5 and release.warmup_steps == 2000
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 3e-6, "steps": 10}))
    cfg = build_config("release", path, {"steps": 20})
    assert (cfg.lr, cfg.steps, cfg.warmup_steps) == (3e-6, 20, 2000)
    assert parse_override("taps=[\"us6\", \"mid\"]") == ("taps", ["us6", "mid"])
    assert build_config(overrides=dict([parse_override("taps=[\"us6\", \"mid\"]")])).taps == ["mid", "us6"]
    assert parse_override("loss=mse") == ("loss", "mse")
    with pytest.raises(ValueError, match="unknown config field"):
        build_config(overrides={"learning_rate": 1})
    with pytest.raises(ValueError, match="unknown loss"):
        build_config(overrides={"loss": "huber"})
    with pytest.raises(ValueError, match="unknown tap"):
        build_config(overrides={"taps": ["us11"]})
    with pytest.raises(ValueError, match="key=value"):
        parse_override("lr")
    from cleandift_rt.cli.train import build_parser

    args = build_parser().parse_args(["--base", "b", "--data", "d", "--out", "o", "--resume", "lr=1e-5"])
    assert args.resume is True and args.resume_from is None and args.overrides == ["lr=1e-5"]


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """Checkpoint metadata sizes vary; 1 in 32 header lengths has the low byte of pickle's magic."""
    from safetensors.torch import save_file

    from cleandift_rt.checkpoint import read_safetensors

    path = tmp_path / "x.safetensors"
    for pad in range(400):
        save_file({"x": torch.zeros(2)}, str(path), metadata={"m": "a" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert list(read_safetensors(path)) == ["x"]
    path.write_bytes(b"\x80\x04\x95" + bytes(20))
    with pytest.raises(ValueError, match="pickle"):
        read_safetensors(path)


# ---------------------------------------------------------------------------------------------
# the paper's variants: text conditioning (appendix B) and FiLM heads (appendix E)


@pytest.mark.parametrize("mode", ["captions", "none", "distill"])
def test_text_conditioning_gives_each_unet_the_text_its_mode_says(mode, tiny_base_dir, data_dir, tmp_path):
    """What teacher and student see in a real training step, against embeddings computed here; the
    step's loss equals an independent recomputation from those embeddings (and not from the other mode's)."""
    import copy

    tr = trainer(config(steps=1, text_conditioning=mode, lr=1e-3, warmup_steps=0), tiny_base_dir, data_dir, tmp_path)
    seen = {"teacher": [], "student": []}
    for role, unet in (("teacher", tr.teacher), ("student", tr.student)):
        unet.register_forward_pre_hook(lambda m, args, kwargs, role=role: seen[role].append(
            (args[0].detach().clone(), args[1].detach().clone(), kwargs["encoder_hidden_states"].detach().clone())),
            with_kwargs=True)
    drawn = []
    next_batch = tr.sampler.next_batch
    tr.sampler.next_batch = lambda n: drawn.append(next_batch(n)) or drawn[-1]
    student_before = copy.deepcopy(tr.student)
    record = tr.train_step()

    captions = drawn[0][1]
    with torch.no_grad():
        caption_text = tr.base.encode_prompt(list(captions) if mode != "none" else [""] * len(captions))
        empty_text = tr.base.encode_prompt([""] * len(captions))
    if mode == "none":
        assert captions == ["", ""]
    else:
        assert all(c.startswith(("a pattern number", "stripes")) for c in captions)
        assert not torch.allclose(caption_text, empty_text)
    want_student = {"captions": caption_text, "none": empty_text, "distill": empty_text}[mode]
    (t_sample, t_steps, t_text), = seen["teacher"]
    (s_sample, s_steps, s_text), = seen["student"]
    assert torch.equal(t_text, caption_text.repeat_interleave(3, 0))  # the teacher: one row per (image, t)
    assert torch.equal(s_text, want_student)  # the student: one row per image

    def loss_with(student_text):
        teacher = _tap_outputs(tr.teacher, t_sample, t_steps, caption_text.repeat_interleave(3, 0))
        student = _tap_outputs(student_before, s_sample, s_steps, student_text)
        return -sum(F.cosine_similarity(student[n].repeat_interleave(3, 0), teacher[n], dim=1).mean()
                    for n in TAPS).item()  # heads are the identity at the first step

    assert record["loss"] == pytest.approx(loss_with(want_student), abs=1e-5)
    if mode != "none":
        other = caption_text if mode == "distill" else empty_text
        assert abs(record["loss"] - loss_with(other)) > 1e-4


def test_resume_refuses_a_changed_text_mode_and_reads_old_checkpoints(tiny_base_dir, data_dir, tmp_path):
    from cleandift_rt.checkpoint import read_safetensors, read_safetensors_metadata, write_safetensors

    cfg = dict(steps=2, checkpoint_every=1, keep_checkpoints=5)
    trainer(config(text_conditioning="distill", **cfg), tiny_base_dir, data_dir, tmp_path / "d").run()
    with pytest.raises(ValueError, match=r"objective changed \(text_conditioning: 'distill' -> 'captions'\)"):
        trainer(config(steps=3, checkpoint_every=1), tiny_base_dir, data_dir, tmp_path / "d", resume=True)
    with pytest.raises(ValueError, match=r"head_conditioning: 'adarms' -> 'film'"):
        trainer(config(steps=3, text_conditioning="distill", head_conditioning="film"), tiny_base_dir, data_dir,
                tmp_path / "d", resume=True)
    assert trainer(config(steps=3, text_conditioning="distill"), tiny_base_dir, data_dir, tmp_path / "d",
                   resume=True).step == 2

    # a checkpoint written before text_conditioning existed: the boolean captions (false) and no head kind
    trainer(config(text_conditioning="none", **cfg), tiny_base_dir, data_dir, tmp_path / "old").run()
    for path in list_checkpoints(tmp_path / "old" / "checkpoints"):
        meta = read_safetensors_metadata(path)
        saved = json.loads(meta["config"])
        del saved["text_conditioning"], saved["head_conditioning"]
        saved["captions"] = False
        write_safetensors(path, read_safetensors(path), {**meta, "config": json.dumps(saved)})
    assert trainer(config(steps=3, text_conditioning="none"), tiny_base_dir, data_dir, tmp_path / "old",
                   resume=True).step == 2
    assert trainer(config(steps=3, captions=False), tiny_base_dir, data_dir, tmp_path / "old", resume=True).step == 2
    with pytest.raises(ValueError, match=r"text_conditioning: 'none' -> 'distill'"):
        trainer(config(steps=3, text_conditioning="distill"), tiny_base_dir, data_dir, tmp_path / "old", resume=True)


def test_text_conditioning_config_and_flags(tmp_path, capsys):
    from cleandift_rt.cli.train import entry
    from cleandift_rt.training.config import TrainConfig

    assert build_config().text_conditioning == "captions" and build_config().head_conditioning == "adarms"
    assert build_config("release").text_conditioning == "captions"  # presets unchanged
    assert build_config(overrides={"captions": False}).text_conditioning == "none"
    assert build_config(overrides={"captions": True}).text_conditioning == "captions"
    assert TrainConfig(captions=False).text_conditioning == "none" and "captions" not in TrainConfig().to_dict()
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"captions": False, "lr": 1e-5}))
    assert build_config(config_file=path).text_conditioning == "none"
    assert build_config(config_file=path, overrides={"text_conditioning": "distill"}).text_conditioning == "distill"
    with pytest.raises(ValueError, match="captions=false and text_conditioning='distill' contradict"):
        build_config(overrides={"captions": False, "text_conditioning": "distill"})
    with pytest.raises(ValueError, match="text_conditioning 'distil' is not one of captions, none, distill"):
        build_config(overrides={"text_conditioning": "distil"})
    with pytest.raises(ValueError, match="head_conditioning 'ada' is not one of adarms, film"):
        build_config(overrides={"head_conditioning": "ada"})
    with pytest.raises(SystemExit) as exit_info:
        entry(["--base", "b", "--data", "d", "--out", str(tmp_path / "o"), "--distill-text", "--no-captions"])
    assert exit_info.value.code == 2
    assert "--no-captions: not allowed with argument --distill-text" in capsys.readouterr().err


def test_distilled_film_student_through_the_cli(tiny_base_dir, data_dir, tmp_path, capsys):
    """--distill-text and head_conditioning=film train end to end; the files and info say so."""
    from cleandift_rt import ProjectionHeads
    from cleandift_rt.checkpoint import read_safetensors_metadata
    from cleandift_rt.formats.artifact import describe
    from cleandift_rt.cli.train import main

    out = tmp_path / "run"
    main(["--base", str(tiny_base_dir), "--data", str(data_dir), "--out", str(out), "--steps", "3", "--batch-size", "2",
          "--size", str(SIZE), "--no-progress", "--distill-text", "head_conditioning=film", "lr=1e-3",
          "warmup_steps=0", "validate_every=3", "val_images=1"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val" in records[-1]  # validation ran with the student on "" and the teacher on captions
    heads = ProjectionHeads.from_release(out / "student_full.safetensors")
    assert heads.conditioning == "film"
    assert heads.adapters["us6"].layers[0].film.linear.weight.abs().max() > 0  # trained away from zero
    assert load_student(out / "student_full.safetensors").text_conditioning == "distill"
    assert read_safetensors_metadata(out / "student_unet.safetensors")["text_conditioning"] == "distill"
    d = describe(out / "student_full.safetensors")
    assert (d["text_conditioning"], d["head_conditioning"]) == ("distill", "film")
    cfg = json.loads(read_safetensors_metadata(out / "checkpoints" / "step-0000003.safetensors")["config"])
    assert (cfg["text_conditioning"], cfg["head_conditioning"]) == ("distill", "film")
