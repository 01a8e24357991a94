"""Diffusion Hyperfeatures (docs/method.md, Diffusion Hyperfeatures): network, loss, training, resume, export, inversion, heat map."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleandift_rt import AggregationNetwork, Aggregator, Engine
from cleandift_rt.checkpoint import read_safetensors, read_safetensors_metadata
from cleandift_rt.cli.main import main as cli_main
from cleandift_rt.evaluation.spair import load_spair
from cleandift_rt.evaluation.pck import spair_validator
from cleandift_rt.hyper.inversion import (InversionExtractor, InversionSettings, ddim_invert, ddim_sample,
                                          saved_calls, schedulers, unet_timesteps)
from cleandift_rt.hyper.loss import clip_loss, grid_indices
from cleandift_rt.hyper.network import AggregationConfig
from cleandift_rt.hyper.picture import heatmap_size
from cleandift_rt.hyper.sources import EngineTaps, InversionTaps, new_aggregator
from random_heads import random_heads
from cleandift_rt.hyper.train import HyperTrainConfig, HyperTrainer
from cleandift_rt.models.heads import ProjectionHeads
from cleandift_rt.taps import TAPS

SIZE = 128  # the tiny model's native size: descriptors 16 x 16


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(student_engine):
    return student_engine(SIZE)


@pytest.fixture(scope="module")
def pairs(spair):
    return load_spair(spair["root"], "trn")[0], load_spair(spair["root"], "val")[0]


@pytest.fixture(scope="module")
def trained(engine, pairs, tmp_path_factory):
    """30 steps of the cleandift source on the test tree (validation every 10 steps)."""
    out = tmp_path_factory.mktemp("hyper") / "run"
    stored = EngineTaps(engine, "tiny-student")
    torch.manual_seed(0)
    trainer = HyperTrainer(new_aggregator("cleandift", stored), stored, pairs[0], out,
                           HyperTrainConfig(steps=30, validate_every=10, checkpoint_every=10), val_pairs=pairs[1],
                           validator=spair_validator, progress=False, log=lambda _: None, device="cpu")
    summary = trainer.run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "summary": summary, "records": records, "stored": stored}


# -- the network and the loss (docs/method.md, Diffusion Hyperfeatures) -----------------------------------------------------


def test_network_shapes_and_init_match_the_spec():
    config = AggregationConfig(layers=("us3", "us6", "us10"), channels=(1280, 384, 320), strides=(32, 16, 8),
                               timesteps=(0.0, 500.0))
    net = AggregationNetwork(config)
    for block, cin in zip(net.bottlenecks, config.channels):
        convs = {"conv1": (96, cin, 1, 1), "conv2": (96, 96, 3, 3), "conv3": (384, 96, 1, 1)}
        if cin != 384:
            convs["shortcut"] = (384, cin, 1, 1)
        else:
            assert block.shortcut is None  # detectron2: identity shortcut when the widths agree
        for name, shape in convs.items():
            conv, norm = getattr(block, name)
            assert tuple(conv.weight.shape) == shape and conv.bias is None
            fan_out = shape[0] * shape[2] * shape[3]  # MSRA fill: He normal, fan_out, ReLU gain
            assert abs(float(conv.weight.detach().std()) / math.sqrt(2 / fan_out) - 1) < 0.05
            assert abs(float(conv.weight.detach().mean())) < 0.05 * math.sqrt(2 / fan_out)
            assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 32
            assert torch.equal(norm.weight, torch.ones(shape[0])) and torch.equal(norm.bias, torch.zeros(shape[0]))
    assert torch.equal(net.mixing_weights, torch.ones(3, 2))
    weights = net.weights().detach()
    assert torch.allclose(weights, torch.full((3, 2), 1 / 6)) and abs(float(weights.sum()) - 1) < 1e-6
    maps = [torch.randn(2, 3, c, SIZE // s, SIZE // s) for c, s in zip(config.channels, config.strides)]
    assert net(maps).shape == (3, 384, SIZE // 8, SIZE // 8)  # 64 x 64 at 512 px
    with pytest.raises(ValueError, match="projection_dim"):
        AggregationConfig(layers=("us6",), channels=(64,), strides=(16,), timesteps=(0.0,), projection_dim=100)
    with pytest.raises(ValueError, match=r"S=2, B, C=1280"):
        net([m[:1] for m in maps])


def test_network_equals_a_per_map_computation():
    """Batched over timesteps and resized by scale factors == one map at a time, resized to the size, mixed."""
    torch.manual_seed(3)
    config = AggregationConfig(layers=("mid", "us6", "us9"), channels=(64, 64, 64), strides=(64, 16, 8),
                               timesteps=(-1.0, 60.0, 160.0), projection_dim=128)
    net = AggregationNetwork(config).eval()
    with torch.no_grad():
        net.mixing_weights.normal_()
        maps = [torch.randn(3, 2, 64, 256 // s, 256 // s) for s in config.strides]
        want = torch.zeros(2, 128, 32, 32)
        weights = torch.softmax(net.mixing_weights.flatten(), 0).view(3, 3)
        for layer, m in enumerate(maps):
            for t in range(3):
                x = F.interpolate(m[t], size=(32, 32), mode="bilinear", align_corners=False)
                want += weights[layer, t] * net.bottlenecks[layer](x)
        torch.testing.assert_close(net(maps), want, rtol=1e-5, atol=1e-5)


def test_loss_equals_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 2, generator=gen), torch.randn(3, 2, 3, generator=gen)
    ia, ib = torch.tensor([0, 3, 1]), torch.tensor([5, 0, 2])
    fa, fb = a.reshape(3, -1).double().numpy(), b.reshape(3, -1).double().numpy()

    def ce(src, trg, rows, labels):
        total = 0.0
        for r, label in zip(rows, labels):
            logits = [float(src[:, r] @ trg[:, j]) / np.linalg.norm(src[:, r]) / np.linalg.norm(trg[:, j]) / 0.07
                      for j in range(trg.shape[1])]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[label]
        return total / len(rows)

    want = (ce(fa, fb, ia.tolist(), ib.tolist()) + ce(fb, fa, ib.tolist(), ia.tolist())) / 2
    assert abs(float(clip_loss(a, b, ia, ib)) - want) < 1e-5
    # keypoints (x, y) in a 100 x 50 image on a 5 x 10 grid: x * 10 / 100, y * 5 / 50, rounded, clipped
    idx = grid_indices([[0, 0], [99, 49], [26, 14], [-5, 80]], (100, 50), (5, 10))
    assert idx.tolist() == [0, 4 * 10 + 9, 1 * 10 + 3, 4 * 10 + 0]


# -- training --------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_raises_val_pck(trained):
    records, out = trained["records"], trained["out"]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_pck" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["step"] for r in vals] == [0, 10, 20, 30]
    assert all(0 <= r["val_pck"] <= 1 for r in vals)
    first, last = np.mean([r["loss"] for r in steps[:5]]), np.mean([r["loss"] for r in steps[-5:]])
    assert last < 0.6 * first, (first, last)
    assert vals[-1]["val_pck"] > vals[0]["val_pck"], vals  # over the untrained network
    meta = read_safetensors_metadata(out / "aggregator.safetensors")
    assert meta["format"] == "cleandift_rt_aggregator" and json.loads(meta["source"])["name"] == "cleandift"
    assert json.loads(meta["config"])["layers"] == list(TAPS) and json.loads(meta["steps"]) == 30
    agg = Aggregator.from_file(out / "aggregator.safetensors")
    assert agg.source == "cleandift" and agg.info["val_pck"] == pytest.approx(vals[-1]["val_pck"])
    assert not np.allclose(agg.mixing_weights(), 1 / len(TAPS))  # the mixing weights learned something
    assert (out / "mixing_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validator_is_the_spec_pck(trained, pairs, tiny_student_files, tiny_base_dir):
    """The validator's PCK equals evaluation.runner.evaluate + pck.summarize on the same descriptors."""
    from PIL import Image

    from cleandift_rt.evaluation.pck import summarize
    from cleandift_rt.evaluation.runner import evaluate
    from cleandift_rt.features.preprocess import load_image
    from cleandift_rt.hyper.train import ValItem

    from argparse import Namespace

    from cleandift_rt.cli.hyper import hyper_source

    # what eval-spair --aggregator builds from its arguments
    source = hyper_source(Namespace(aggregator=str(trained["out"] / "aggregator.safetensors"),
                                    engine=str(tiny_student_files["unet"]), base=str(tiny_base_dir), device="cpu",
                                    size=[SIZE, SIZE], backend=None, precision=None))
    assert source.describe()["source"] == "cleandift"
    run = evaluate(pairs[1], source, progress=False, method="analytic")
    want = summarize(run.results, alphas=(0.1,))["pck"]["bbox"]["0.1"]["point"] / 100
    items = []
    for p in pairs[1]:
        sizes = [Image.open(path).size for path in (p.source, p.target)]
        item = ValItem(p.pair_id, p.category, p.source, p.target, sizes[0], sizes[1], p.source_points,
                       p.target_points, p.target_bbox)
        items.append((item, *(source.features(load_image(path, exif_orientation=False)) for path in (p.source, p.target))))
    assert spair_validator(items) == pytest.approx(want, abs=1e-12)
    assert 0 < want < 1


def test_resume_is_exact_and_the_cache_changes_nothing(engine, pairs, tmp_path):
    stored = EngineTaps(engine, "tiny-student")
    config = HyperTrainConfig(steps=6, val_pairs=0, checkpoint_every=3)

    def trainer(out, steps, resume=False, cache="shared", lr=1e-3):
        torch.manual_seed(0)
        return HyperTrainer(new_aggregator("cleandift", stored), stored, pairs[0], tmp_path / out,
                            HyperTrainConfig(**{**config.to_dict(), "steps": steps, "lr": lr}), resume=resume,
                            cache_dir=None if cache is None else tmp_path / cache, progress=False, log=lambda _: None,
                            device="cpu")

    def losses(out):
        return [r["loss"] for r in map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines())]

    trainer("full", 6).run()
    trainer("split", 3).run()
    with pytest.raises(ValueError, match="already holds aggregator checkpoints"):
        trainer("split", 6)
    with pytest.raises(ValueError, match="lr"):
        trainer("split", 6, resume=True, lr=5e-4)
    trainer("split", 6, resume=True).run()
    full, split = (read_safetensors(tmp_path / d / "aggregator.safetensors") for d in ("full", "split"))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    assert losses("split") == losses("full")
    trainer("uncached", 3, cache=None).run()  # --cache none: recomputed, the same fp16 rounding
    assert losses("uncached") == losses("full")[:3]


def test_heat_map_from_info_is_a_png_of_the_right_size(trained, tmp_path, capsys):
    path = trained["out"] / "aggregator.safetensors"
    assert cli_main(["info", str(path), "--out", str(tmp_path / "w.png")]) == 0
    out = capsys.readouterr().out
    assert "source cleandift" in out and "us10 (32 ch)" in out
    from PIL import Image

    raw = (tmp_path / "w.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "w.png") as im:
        assert im.format == "PNG" and im.size == heatmap_size(len(TAPS), 1)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # cells, text, legend: not a blank canvas
    assert cli_main(["info", str(path), "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["mixing_weights"]
    assert abs(sum(map(sum, weights)) - 1) < 1e-5
    assert cli_main(["info", str(trained["out"] / "checkpoints" / "step-0000030.safetensors"), "--out",
                     str(tmp_path / "x.png")]) == 2
    assert "not one" in capsys.readouterr().err


# -- inference: Engine and ONNX export --------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_aggregator(tiny_student_files, engine, tmp_path_factory):
    """An untrained cleandift-heads aggregator over three taps, its mixing weights made non-uniform."""
    torch.manual_seed(1)
    stored = EngineTaps(engine, "tiny-student", layers=["us3", "us6", "us9"])
    agg = new_aggregator("cleandift-heads", stored, ProjectionHeads.from_release(tiny_student_files["full"]),
                         timesteps=(100.0, 700.0), projection_dim=128)
    with torch.no_grad():
        agg.network.mixing_weights.normal_()
    return agg.save(tmp_path_factory.mktemp("heads") / "aggregator.safetensors")


def test_film_heads_aggregator_saves_loads_and_both_head_paths_agree(engine, photos, tmp_path, monkeypatch):
    """cleandift-heads with FiLM heads: the file keeps their kind, and the fused kernel, the PyTorch
    form an export traces (modulation frozen as constants) and the heads module give one result."""
    from cleandift_rt.hyper import aggregator as aggregator_module

    stored = EngineTaps(engine, "tiny-student", layers=["us3", "us6", "us9"])
    heads = random_heads(dict(zip(stored.layers, stored.channels)), seed=3, scale=0.02, conditioning="film")
    path = new_aggregator("cleandift-heads", stored, heads, timesteps=(100.0, 700.0),
                          projection_dim=128).save(tmp_path / "film.safetensors")
    agg = Aggregator.from_file(path)
    assert agg.heads.conditioning == "film"
    x = torch.from_numpy(engine.extract([photos["cat"]], taps=["us6"])["us6"])
    with torch.no_grad():
        want = heads("us6", x, 700.0)
        torch.testing.assert_close(agg._head("us6", x, 700.0), want, rtol=1e-4, atol=1e-5)
        monkeypatch.setattr(aggregator_module, "_fused_heads_run_on", lambda device: False)
        agg.freeze_head_modulation()
        torch.testing.assert_close(agg._head("us6", x, 700.0), want, rtol=1e-5, atol=1e-6)


def test_engine_hyper_tap(engine, heads_aggregator, tiny_student_files, tiny_base_dir, photos):
    hyper = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(SIZE, SIZE), aggregator=heads_aggregator)
    assert hyper.taps == (*TAPS, "hyper")
    images = [photos["cat"], photos["coffee"]]
    both = hyper.extract(images, taps=["us6", "hyper"])
    assert list(both) == ["us6", "hyper"] and both["hyper"].shape == (2, 128, SIZE // 8, SIZE // 8)
    assert list(hyper.extract(images, taps=["hyper"])) == ["hyper"]
    agg = Aggregator.from_file(heads_aggregator)
    taps = engine.extract(images, taps=["us3", "us6", "us9"])
    with torch.no_grad():
        want = agg({t: torch.from_numpy(v) for t, v in taps.items()}).numpy()
    np.testing.assert_allclose(both["hyper"], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the heads' fused kernel and their PyTorch form agree
        x = torch.from_numpy(taps["us6"])
        torch.testing.assert_close(agg._head("us6", x, 700.0), agg.heads("us6", x, 700.0), rtol=1e-4, atol=1e-5)
    narrow = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(SIZE, SIZE), taps=["us6"],
                    aggregator=heads_aggregator)
    assert narrow.taps == ("us6", "hyper")  # beside the requested default taps
    np.testing.assert_allclose(narrow.extract(images)["hyper"], both["hyper"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="aggregator=FILE"):
        engine.extract(images, taps=["hyper"])
    assert "hyper" not in engine.taps


def test_onnx_export_with_the_aggregator_equals_pytorch(heads_aggregator, tiny_student_files, tiny_base_dir, photos,
                                                        tmp_path, capsys):
    import sys

    from cleandift_rt.export.mixed_precision import PrecisionPolicy
    from cleandift_rt.export.onnx_export import write_fp16_onnx
    from cleandift_rt.formats.artifact import read_onnx_info

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "export"))
    try:
        import export_onnx
    finally:
        sys.path.pop(0)
    out = tmp_path / "hyper.onnx"
    assert export_onnx.main(["--student", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--out",
                             str(out), "--dynamic-size", "64", "192", "--taps", "us6", "--aggregator",
                             str(heads_aggregator)]) == 0
    extra = read_onnx_info(out).extra["hyper"]
    assert extra["channels"] == 128 and extra["stride"] == 8 and extra["layers"] == ["us3", "us6", "us9"]
    images = [photos["cat"], photos["coffee"], photos["astronaut"]]
    reference = Engine(tiny_student_files["unet"], base=str(tiny_base_dir), size=(SIZE, SIZE),
                       aggregator=heads_aggregator).extract(images, taps=["us6", "hyper"])
    onnx_engine = Engine(out, size=(SIZE, SIZE), device="cpu", precision="fp32")
    assert onnx_engine.taps == ("us6", "hyper")
    ours = onnx_engine.extract(images)
    for name in ("us6", "hyper"):  # the export tests' tolerance
        assert ours[name].shape == reference[name].shape
        assert cosine(ours[name], reference[name]).min() >= 0.99999
        assert np.abs(ours[name] - reference[name]).max() / np.abs(reference[name]).max() < 1e-3
    np.testing.assert_allclose(onnx_engine.extract(images[:1], taps=["hyper"])["hyper"], ours["hyper"][:1],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already computes 'hyper'"):
        Engine(out, aggregator=heads_aggregator)
    assert cli_main(["info", str(out)]) == 0
    assert "hyper: 128 ch, /8, the cleandift-heads aggregator" in capsys.readouterr().out
    half = tmp_path / "hyper16.onnx"
    write_fp16_onnx(out, half, PrecisionPolicy(max_abs=None), log=lambda *_: None)
    fp16 = Engine(half, size=(SIZE, SIZE), device="cpu", precision="fp32").extract(images, taps=["hyper"])["hyper"]
    assert cosine(fp16, ours["hyper"]).min() >= 0.999


def test_engine_refuses_aggregators_it_cannot_run(tiny_base, tiny_student_files, tiny_base_dir, tmp_path):
    extractor = InversionExtractor(tiny_base, InversionSettings(steps=2, saved=2, size=64), taps=["us6"])
    path = new_aggregator("inversion", InversionTaps(extractor, "tiny")).save(tmp_path / "inv.safetensors")
    with pytest.raises(ValueError, match="DDIM inversion"):
        Engine(tiny_student_files["unet"], base=str(tiny_base_dir), aggregator=path)
    with pytest.raises(ValueError, match="not an aggregator file"):
        Engine(tiny_student_files["unet"], base=str(tiny_base_dir), aggregator=tiny_student_files["unet"])


# -- the inversion source -------------------------------------------------------------------------


def test_inversion_schedule_is_the_originals(tiny_base):
    inverse, _ = schedulers(tiny_base)
    timesteps = unet_timesteps(inverse, 50)
    assert timesteps[:3] == [-1, 0, 20] and timesteps[-1] == 960 and len(timesteps) == 50
    calls = saved_calls(50, 11)
    assert [49 - c for c in calls][::-1] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 49]  # the original's slots
    assert [timesteps[c] for c in calls] == [-1, 60, 160, 260, 360, 460, 560, 660, 760, 860, 960]
    assert saved_calls(1, 1) == [0] and unet_timesteps(inverse, 1) == [-1]  # one-step: one call at -1
    with pytest.raises(ValueError, match="S <= inversion steps T"):
        saved_calls(4, 5)


def test_inversion_then_sampling_returns_the_latent(tiny_base):
    """DDIM inversion followed by DDIM sampling on the same schedule is the identity when the model's
    prediction is consistent along the path: on the tiny U-Net with its output layer's weights zeroed
    (prediction = its bias, a constant), the latent comes back to 1e-5 relative; sampling on a grid one
    step off leaves errors above 1e-3. (With random weights the prediction changes along the path and
    neither direction is exact: that is DDIM's approximation, not the schedule's.)"""
    unet = copy.deepcopy(tiny_base.unet)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
    inverse, forward = schedulers(tiny_base)
    calls = []
    unet.register_forward_pre_hook(lambda _m, args: calls.append(float(args[1])))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = tiny_base.encode_prompt("")
    x_t, kept = ddim_invert(unet, inverse, x0, embeds, 50, keep=[0, 49], taps=["us6"])
    assert calls == [float(t) for t in unet_timesteps(inverse, 50)] and set(kept) == {0, 49}
    assert float((x_t - x0).norm()) > float(x0.norm()) / 2  # it really went somewhere (alpha_bar ~ 0.005 at 980)
    back = ddim_sample(unet, forward, x_t, embeds, 50)
    assert float((back - x0).norm() / x0.norm()) < 1e-5
    off = type(forward).from_config({**forward.config, "steps_offset": 1})
    wrong = ddim_sample(unet, off, x_t, embeds, 50)
    assert float((wrong - x0).norm() / x0.norm()) > 1e-3


def test_inversion_and_one_step_sources(tiny_base, tiny_base_dir, photos, pairs, tmp_path):
    from cleandift_rt.features.capture import unet_taps
    from cleandift_rt.features.preprocess import prepare_images

    one = InversionExtractor(tiny_base, InversionSettings.one_step(size=64), taps=["us3", "us6"])
    assert one.timesteps == (-1.0,)
    feats = one.extract(photos["cat"])
    assert feats["us6"].shape == (1, 64, 4, 4)
    again = one.extract(photos["cat"])
    assert np.array_equal(feats["us6"], again["us6"])  # the posterior sample is seeded by the pixels
    # one-step == one U-Net call at timestep -1 on a posterior sample seeded by the pixels
    import hashlib

    pixels = prepare_images([photos["cat"]], (64, 64)).pixels
    seed = int.from_bytes(hashlib.sha256(b"0" + pixels.numpy().tobytes()).digest()[:8], "little") >> 1
    latents = tiny_base.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(latents, tiny_base.encode_images(pixels))  # a sample, not the mean
    want = unet_taps(tiny_base.unet, latents, -1, tiny_base.encode_prompt(""), ["us6"])["us6"]
    np.testing.assert_array_equal(feats["us6"][0], want[0].numpy())
    full = InversionExtractor(tiny_base, InversionSettings(steps=4, saved=2, size=64), taps=["us6"])
    assert full.timesteps == (-1.0, 500.0) and full.extract(photos["cat"])["us6"].shape == (2, 64, 4, 4)
    stored = InversionTaps(full, "tiny")
    torch.manual_seed(0)
    trainer = HyperTrainer(new_aggregator("inversion", stored, projection_dim=128), stored, pairs[0], tmp_path / "inv",
                           HyperTrainConfig(steps=2, val_pairs=0), cache_dir=None, progress=False, log=lambda _: None,
                           device="cpu")
    assert trainer.run()["steps"] == 2
    agg = Aggregator.from_file(tmp_path / "inv" / "aggregator.safetensors")
    from argparse import Namespace

    from cleandift_rt.cli.hyper import hyper_source

    source = hyper_source(Namespace(aggregator=str(tmp_path / "inv" / "aggregator.safetensors"),
                                    base=str(tiny_base_dir), device="cpu"))
    assert source.features(photos["cat"]).shape == (128, 8, 8)
    with torch.no_grad():  # the same descriptors as the aggregator on the extractor's features
        want = agg({t: torch.from_numpy(v)[None] for t, v in full.extract(photos["cat"]).items()})[0]
    torch.testing.assert_close(source.features(photos["cat"]), want)


# -- the command ----------------------------------------------------------------------------------


def test_train_aggregator_command(spair, tiny_student_files, tiny_base_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train-aggregator", "--root", str(spair["root"]), "--source", "cleandift-heads", "--engine",
            str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--heads", str(tiny_student_files["full"]),
            "--out", str(out), "--steps", "3", "--size", str(SIZE), str(SIZE), "--timesteps", "2", "--layers", "us6",
            "us9", "--no-progress", "--device", "cpu"]
    assert cli_main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_pck" in r] == [0, 3]
    agg = Aggregator.from_file(out / "aggregator.safetensors")
    assert agg.source == "cleandift-heads" and agg.heads.taps == ("us6", "us9") and agg.timesteps == (0.0, 999.0)
    assert cli_main(args + ["--resume"]) == 0  # already at its last step: nothing to redo, nothing lost
    assert Aggregator.from_file(out / "aggregator.safetensors").info["val_pck"] == records[-1]["val_pck"]
    engine_args = ["--engine", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--size", str(SIZE),
                   str(SIZE), "--device", "cpu"]
    results = tmp_path / "hyper-pck.json"  # the trained aggregator through the evaluation and the match picture
    assert cli_main(["eval-spair", "--root", str(spair["root"]), "--aggregator", str(out / "aggregator.safetensors"),
                     *engine_args, "--out", str(results), "--limit", "1", "--no-progress"]) == 0
    doc = json.loads(results.read_text())
    assert doc["protocol"]["aggregator"].endswith("aggregator.safetensors") and doc["counts"]["pairs"] >= 1
    picture = tmp_path / "hyper-match.png"
    image = next(p for p in sorted((spair["root"] / "JPEGImages").rglob("*.jpg")) if "broken" not in p.name)
    assert cli_main(["match", str(image), str(image), "--aggregator", str(out / "aggregator.safetensors"),
                     *engine_args, "--out", str(picture)]) == 0
    assert picture.stat().st_size > 0 and "hyper" in capsys.readouterr().out
    capsys.readouterr()
    for bad, message in ((["--source", "inversion", "--engine", "x.onnx"], "no --engine"),
                         (["--source", "cleandift"], "pass --engine"),
                         (["--source", "cleandift-heads", "--engine", str(tiny_student_files["unet"]), "--base",
                           str(tiny_base_dir)], "pass --heads")):
        assert cli_main(["train-aggregator", "--root", str(spair["root"]), "--out", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
