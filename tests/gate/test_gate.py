"""GATE (docs/method.md, GATE): techniques, feature kinds, content-shift score, buckets, amalgamation training.

Tiny models with the real topologies: a ControlNetModel.from_unet of the tiny base (its zero
convolutions given random weights, as after training), LoRAs written with peft (zero and non-zero
B matrices, diffusers and kohya formats, and the same LoRA merged into a U-Net folder).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cleandift_rt.gate import Bucket, GateExtractor, GateRecipe, content_shift_score
from cleandift_rt.gate import extract as gate_extract
from cleandift_rt.gate.amalgam import Amalgamator, clip_loss, grid_indices, sparsity_term
from cleandift_rt.gate.recipe import SPAIR_PROMPT
from cleandift_rt.models import load_base

SIZE = 128  # tiny model: 16 x 16 latent, the grid of tap us9
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_state(unet, nonzero: bool, seed: int = 3):
    """A peft LoRA on a copy of ``unet``: its state dict in diffusers' format (B zero unless ``nonzero``)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unet)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=TARGETS))
    if nonzero:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, get_peft_model_state_dict(model)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_base):
    """Paths of the technique files: ControlNet folder, LoRAs (zero, non-zero, kohya), merged U-Net, a pickle."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("gate_models")
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(tiny_base.unet)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # zero-initialised outputs get trained-looking weights, so residuals are not zero
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    controlnet.save_pretrained(root / "controlnet", safe_serialization=True)
    paths = {"controlnet": root / "controlnet"}
    for label, nonzero in (("lora_zero", False), ("lora", True)):
        model, state = _lora_state(tiny_base.unet, nonzero)
        StableDiffusionPipeline.save_lora_weights(root / label, unet_lora_layers=convert_state_dict_to_diffusers(state))
        paths[label] = root / label / "pytorch_lora_weights.safetensors"
        if nonzero:
            kohya = {f"lora_unet_{k}": v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}
            save_file(kohya, root / "kohya.safetensors")
            paths["kohya"] = root / "kohya.safetensors"
            model.fuse_lora()
            model.unload_lora()
            model.save_pretrained(root / "merged", safe_serialization=True)
            paths["merged"] = root / "merged"
    torch.save({"w": torch.zeros(2)}, root / "lora.bin")
    (root / "pickle.safetensors").write_bytes((root / "lora.bin").read_bytes())
    paths.update(bin=root / "lora.bin", pickle=root / "pickle.safetensors")
    return paths


@pytest.fixture
def fresh_base(tiny_base_dir):
    """A base model of our own: LoRA adapters are injected into the U-Net they are given."""
    return load_base(tiny_base_dir)


def _extractor(base, **kwargs):
    return GateExtractor(base, size=SIZE, **kwargs)


def _full_forward_hooks(unet, paths, *args, **kwargs):
    out, handles = {}, []
    for path in paths:
        def hook(_m, _i, o, path=path):
            out[path] = o if isinstance(o, torch.Tensor) else o[0]
        handles.append(unet.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


# -- feature kinds --------------------------------------------------------------------------------


def test_conv_features_reach_block3_and_match_hooks(fresh_base, photos):
    from cleandift_rt.features.capture import unet_capture

    unet = fresh_base.unet
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    ran = []
    handle = unet.conv_out.register_forward_hook(lambda *_: ran.append("conv_out"))
    try:
        with torch.no_grad():
            got = unet_capture(unet, x, 50, ctx, taps=["us3", "us6", "us9"], modules=["up_blocks.3"])
    finally:
        handle.remove()
    assert ran == []  # stopped after up_blocks.3
    ref = _full_forward_hooks(unet, ["up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0",
                                     "up_blocks.3"], x, 50, encoder_hidden_states=ctx)
    for key, path in zip(["us3", "us6", "us9", "up_blocks.3"], ref):
        assert torch.equal(got[key], ref[path]), key
    feat = _extractor(fresh_base).features(photos["cat"], GateRecipe())
    assert feat.shape == (64 + 64 + 64 + 32, 16, 16)  # us3, us6, us9 (64 ch each) + up_blocks.3 (32) on the us9 grid
    with pytest.raises(ValueError, match="no module 'up_blocks.9'"):
        unet_capture(unet, x, 50, ctx, modules=["up_blocks.9"])


def test_attention_probabilities_sum_to_one_and_match_an_independent_softmax(fresh_base, photos):
    from cleandift_rt.features.capture import cross_attention_layers, unet_capture

    unet = fresh_base.unet
    layers = cross_attention_layers(unet, (1, 2))
    assert len(layers) == 6 and all(p.endswith("attn2") for p in layers)  # 3 transformers per block, one attn2 each
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    inputs = {}
    handles = [unet.get_submodule(p).register_forward_pre_hook(
        lambda _m, a, kw, p=p: inputs.__setitem__(p, (a[0], kw["encoder_hidden_states"])), with_kwargs=True)
        for p in layers]
    originals = {p: type(unet.get_submodule(p).processor) for p in layers}
    try:
        with torch.no_grad():
            got = unet_capture(unet, x, 50, ctx, taps=["us9"], attention_probs=layers)
    finally:
        for h in handles:
            h.remove()
    assert {p: type(unet.get_submodule(p).processor) for p in layers} == originals  # default processors back
    for path in layers:
        attn = unet.get_submodule(path)
        hidden, context = inputs[path]
        q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = attn.to_k(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        reference = torch.softmax(q.double() @ k.double().transpose(-1, -2) * attn.scale, dim=-1).mean(1)
        assert got[path].shape == (1, hidden.shape[1], 77)
        torch.testing.assert_close(got[path].sum(-1), torch.ones(1, hidden.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[path].double(), reference, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the explicit softmax leaves the network's output as the default (SDPA) processor's
        plain = unet_capture(unet, x, 50, ctx, taps=["us9"])
    torch.testing.assert_close(got["us9"], plain["us9"], atol=1e-5, rtol=1e-4)
    feat = _extractor(fresh_base).features(photos["cat"], GateRecipe(prompt="a cat"), kind="attention")
    assert feat.shape == (154, 16, 16)  # 77 tokens x 2 block sizes
    torch.testing.assert_close(feat[:77].sum(0), torch.ones(16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(feat[77:].sum(0), torch.ones(16, 16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not cross-attention"):
        unet_capture(unet, x, 50, ctx, attention_probs=["up_blocks.1.attentions.0.transformer_blocks.0.attn1"])


# -- the noisy baseline and multi-step denoising ------------------------------------------------


def test_one_pass_baseline_equals_dift_noising(fresh_base, photos):
    """img2img noising at t = 50 (posterior sample + add_noise) equals DIFT's noising with one sample."""
    from cleandift_rt.features.extractor import DiftExtractor

    parts = _extractor(fresh_base).extract(photos["cat"], GateRecipe(prompt="a cat", seed=5))
    dift = DiftExtractor(fresh_base, t=50, ensemble=1, seed=5, size=SIZE, prompt="a cat")
    ref = dift.extract([photos["cat"]], taps=["us3", "us6", "us9"])
    for tap in ("us3", "us6", "us9"):
        torch.testing.assert_close(parts[tap], ref[tap][0], atol=1e-5, rtol=1e-5)


def _record_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda _m, args, kw: calls.append(int(args[1])), with_kwargs=True)
    return calls, handle


def test_multistep_calls_and_independent_ddim_reference(fresh_base, photos, models):
    ex = _extractor(fresh_base, controlnets={"canny": models["controlnet"]})
    recipe = GateRecipe(controlnet="canny", t=50, t_start=60, seed=2)
    calls, h1 = _record_calls(ex.unet)
    control_calls, h2 = _record_calls(ex.controlnets["canny"])
    try:
        got = ex.extract(photos["cat"], recipe)
        assert calls == list(range(60, 49, -1)) == control_calls and recipe.unet_calls == 11
        calls.clear()
        ex.extract(photos["cat"], GateRecipe(t=50))
        assert calls == [50]
    finally:
        h1.remove(), h2.remove()
    # the same recipe written out with the DDIM formulas (eta 0, one training timestep per step)
    from cleandift_rt.features.preprocess import prepare_images
    from cleandift_rt.gate.techniques import canny_control

    pixels = prepare_images([photos["cat"]], SIZE).pixels
    gen = torch.Generator().manual_seed(2)
    dist = fresh_base.vae.encode(pixels).latent_dist
    latent = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * fresh_base.scaling_factor
    abar = fresh_base.alphas_cumprod.double()
    x = (abar[60].sqrt() * latent + (1 - abar[60]).sqrt() * torch.randn(latent.shape, generator=gen)).float()
    ctx, cond, cn = fresh_base.encode_prompt(""), canny_control(pixels), ex.controlnets["canny"]
    with torch.no_grad():
        for t in range(60, 50, -1):
            down, mid = cn(x, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
            eps = ex.unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            x = (abar[t - 1].sqrt() * x0 + (1 - abar[t - 1]).sqrt() * eps).float()
        down, mid = cn(x, 50, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        ref = _full_forward_hooks(ex.unet, ["up_blocks.2.upsamplers.0"], x, 50, encoder_hidden_states=ctx,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid)
    torch.testing.assert_close(got["us9"], ref["up_blocks.2.upsamplers.0"][0], atol=1e-4, rtol=1e-4)


def test_student_one_pass_at_its_timestep(fresh_base, tiny_student, photos):
    ex = _extractor(fresh_base, student=copy.deepcopy(tiny_student))
    calls, handle = _record_calls(ex.unet)
    try:
        ex.extract(photos["cat"], GateRecipe(seed=3))
    finally:
        handle.remove()
    assert calls == [261]
    with pytest.raises(ValueError, match="noisy baseline only"):
        ex.extract(photos["cat"], GateRecipe(t_start=60))


# -- techniques -----------------------------------------------------------------------------------


def test_controlnet_residuals_reach_the_unet(fresh_base, photos, models, monkeypatch):
    ex = _extractor(fresh_base, controlnets={"canny": models["controlnet"]})
    img = photos["cat"]
    plain = ex.features(img, GateRecipe())
    with_cn = ex.features(img, GateRecipe(controlnet="canny"))
    assert not torch.allclose(plain, with_cn, atol=1e-4)
    assert torch.equal(ex.features(img, GateRecipe(controlnet="canny", controlnet_scale=0.0)), plain)
    other = gate_extract.canny_control(torch.rand(1, 3, SIZE, SIZE) * 2 - 1)  # another control image, same input
    monkeypatch.setattr(gate_extract, "canny_control", lambda pixels: other)
    assert not torch.allclose(ex.features(img, GateRecipe(controlnet="canny")), with_cn, atol=1e-4)
    assert torch.equal(ex.features(img, GateRecipe()), plain)  # without ControlNet the control image is unused


def test_canny_control_is_opencv_with_the_paper_thresholds(photos):
    import cv2

    from cleandift_rt.features.preprocess import prepare_images
    from cleandift_rt.gate.techniques import canny_control

    pixels = prepare_images([photos["coffee"]], SIZE).pixels
    edges = canny_control(pixels)
    img = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    ref = torch.from_numpy(cv2.Canny(img, 100, 200)).float() / 255
    assert edges.shape == (1, 3, SIZE, SIZE) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert all(torch.equal(edges[0, c], ref) for c in range(3)) and edges.sum() > 0


def test_lora_zero_changes_nothing_nonzero_changes_and_formats_agree(fresh_base, photos, models):
    ex = _extractor(fresh_base, loras={"zero": models["lora_zero"], "style": models["lora"], "kohya": models["kohya"],
                                       "merged": models["merged"]})
    img = photos["cat"]
    plain = ex.features(img, GateRecipe())
    assert torch.equal(ex.features(img, GateRecipe(lora="zero")), plain)
    style = ex.features(img, GateRecipe(lora="style"))
    assert not torch.allclose(style, plain, atol=1e-4)
    torch.testing.assert_close(ex.features(img, GateRecipe(lora="kohya")), style, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.features(img, GateRecipe(lora="merged")), style, atol=1e-4, rtol=1e-4)
    half = ex.features(img, GateRecipe(lora="style", lora_scale=0.5))
    assert not torch.allclose(half, style, atol=1e-4) and not torch.allclose(half, plain, atol=1e-4)
    assert torch.equal(ex.features(img, GateRecipe()), plain)  # adapters off again after a LoRA recipe
    with pytest.raises(ValueError, match="merged U-Net folder"):
        ex.features(img, GateRecipe(lora="merged", lora_scale=0.5))
    with pytest.raises(ValueError, match="this extractor has"):
        ex.features(img, GateRecipe(lora="nowhere"))


def test_local_files_only_and_pickles_refused(fresh_base, models, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors file \(pickled"):
        _extractor(fresh_base, loras={"x": models["bin"]})
    with pytest.raises(ValueError, match="pickle"):
        _extractor(fresh_base, loras={"x": models["pickle"]})
    pickled_cn = tmp_path / "cn"
    pickled_cn.mkdir()
    (pickled_cn / "config.json").write_text((models["controlnet"] / "config.json").read_text())
    torch.save({}, pickled_cn / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        _extractor(fresh_base, controlnets={"x": pickled_cn})
    with pytest.raises(ValueError, match="diffusers ControlNetModel folder"):
        _extractor(fresh_base, controlnets={"x": "lllyasviel/sd-controlnet-canny"})  # a hub id is not a folder
    with pytest.raises(ValueError, match="neither a LoRA"):
        _extractor(fresh_base, loras={"x": tmp_path})


# -- content-shift score --------------------------------------------------------------------------


def test_content_shift_score_properties(photos):
    from cleandift_rt.gate.score import laplacian_difference

    img = np.asarray(photos["cat"].resize((96, 96))).astype(np.float32) / 255
    field = F.avg_pool2d(torch.from_numpy(img).permute(2, 0, 1)[None], 5, 1, 2)[0]  # smooth, like feature maps

    def shifted(s: int) -> torch.Tensor:  # the reference warped by a translation of s pixels
        return field[:, 12 + s: 76 + s, 12:76]

    reference, anchor = shifted(0), shifted(10)
    assert content_shift_score(reference, reference, anchor) == 1.0
    assert content_shift_score(anchor, reference, anchor) == pytest.approx(0.0, abs=1e-12)
    scores = [content_shift_score(shifted(s), reference, anchor) for s in (0, 1, 2, 4, 8, 10)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert content_shift_score(shifted(14), reference, anchor) < 0.2
    assert content_shift_score(reference * 3, reference, anchor) == pytest.approx(1.0, abs=1e-4)  # no shift
    assert laplacian_difference(reference[None], reference) == 0.0
    with pytest.raises(ValueError, match="anchor's contours equal"):
        content_shift_score(anchor, reference, reference)
    with pytest.raises(ValueError, match="differ in shape"):
        content_shift_score(reference[:, :32], reference, anchor)
    with pytest.raises(ValueError, match="NaN"):
        content_shift_score(reference * float("nan"), reference, anchor)


# -- buckets --------------------------------------------------------------------------------------


def paper_bucket(controlnet: str, lora_a: str, lora_b: str) -> dict:
    """The paper's SPair correspondence bucket (appendix C.2.1 and its README), as docs/gate.md shows it."""
    return {"format": "cleandift-gate-bucket", "version": 1, "size": 512,
            "controlnets": {"canny": controlnet}, "loras": {"spair_a": lora_a, "spair_b": lora_b},
            "conv": [{"prompt": SPAIR_PROMPT, "seed": 0}, {"prompt": SPAIR_PROMPT, "seed": 1},
                     {"prompt": "a photo", "lora": "spair_a"}, {"prompt": "a photo", "lora": "spair_b"},
                     {"prompt": "a photo", "controlnet": "canny", "t_start": 60, "seed": 0},
                     {"prompt": "a photo", "controlnet": "canny", "t_start": 60, "seed": 1}],
            "attention": {"prompt": "a photo of " + SPAIR_PROMPT.split("a photo of ")[1].split(", high")[0],
                          "controlnet": "canny", "lora": "spair_a", "t_start": 60}}


def test_bucket_json_round_trip_and_errors(models, tmp_path):
    doc = paper_bucket(str(models["controlnet"]), str(models["lora"]), str(models["kohya"]))
    path = tmp_path / "bucket.json"
    path.write_text(json.dumps(doc))
    bucket = Bucket.load(path)
    assert len(bucket.conv) == 6 and bucket.attention.t_start == 60 and bucket.used_loras == ["spair_a", "spair_b"]
    assert Bucket.from_dict(bucket.to_dict()).to_dict() == bucket.to_dict()
    relative = dict(doc, controlnets={"canny": "cn"})
    (tmp_path / "cn").mkdir()
    assert Bucket.from_dict(relative, root=tmp_path).controlnets["canny"] == str((tmp_path / "cn").resolve())
    bad = [(dict(doc, colour=1), "unknown field"), (dict(doc, version=2), "version 2"),
           (dict(doc, conv=[{"lora": "nope"}]), "does not name"), (dict(doc, conv=[{}, {}]), "repeats conv"),
           (dict(doc, conv=[{"t": 70, "t_start": 60}]), "must lie above"), (dict(doc, conv=[]), "at least one conv"),
           (dict(doc, conv=[{"promt": "x"}]), "unknown field"), (dict(doc, size=100), "multiple of 64"),
           (dict(doc, conv=[{"prompt": "a {cat}"}]), "only {category}")]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            Bucket.from_dict(data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Bucket.from_dict(dict(doc, loras={"spair_a": "missing.safetensors", "spair_b": "x"}), root=tmp_path)


# -- amalgamation ---------------------------------------------------------------------------------


def test_amalgamator_weights_and_clip_loss():
    torch.manual_seed(0)
    model = Amalgamator(conv_channels=8, attention_channels=4, features=3).eval()
    conv, attention = torch.randn(2, 3, 8, 6, 6), torch.rand(2, 4, 6, 6)
    out, weights = model(conv, attention)
    assert out.shape == (2, 12, 6, 6) and weights.shape == (2, 3, 8)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 8))
    assert sparsity_term(torch.tensor([[[1.0], [0.0]]])) == -1.0  # one-hot: the most negative (sparsest)
    assert sparsity_term(torch.full((1, 2, 1), 0.5)) > -1.0
    idx = grid_indices(torch.tensor([[0.0, 0.0], [99.0, 49.0], [50.0, 25.0]]), (100, 50), (5, 10))
    assert idx.tolist() == [0, 49, 25]  # scaled per axis, rounded (2.5 -> 2), clipped to the grid
    src, trg = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    si, ti = torch.tensor([0, 5, 11]), torch.tensor([3, 3, 7])
    a, b = src.flatten(1).T.double(), trg.flatten(1).T.double()  # the loss written out pixel pair by pixel pair
    cos = torch.tensor([[float(F.cosine_similarity(a[i], b[j], dim=0)) for j in range(12)] for i in range(12)])
    logits = cos / 0.07
    expected = sum(-torch.log_softmax(logits[i], 0)[j] - torch.log_softmax(logits[:, j], 0)[i] for i, j in zip(si, ti))
    torch.testing.assert_close(clip_loss(src, trg, si, ti).double(), (expected / (2 * len(si))).double(), atol=1e-5,
                               rtol=1e-5)


# -- training on the SPair-layout test tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def spair_pairs(spair):
    from cleandift_rt.evaluation.spair import load_spair

    pairs, _ = load_spair(spair["root"], "test")
    return pairs


def _small_bucket(models) -> Bucket:
    return Bucket(conv=[GateRecipe(prompt="a photo of a {category}"), GateRecipe(controlnet="canny", seed=1)],
                  attention=GateRecipe(prompt="a photo of a {category}"), controlnets={"canny": str(models["controlnet"])})


def test_training_lowers_the_loss_and_resumes_exactly(fresh_base, models, spair_pairs, tmp_path):
    from cleandift_rt.gate.train import GateTrainConfig, GateTrainer
    from cleandift_rt.checkpoint import read_safetensors

    bucket = _small_bucket(models)
    ex = GateExtractor.for_bucket(bucket, fresh_base, size=SIZE)
    config = GateTrainConfig(epochs=4, max_pairs=None, size=SIZE, checkpoint_every=5)
    cache = tmp_path / "features"
    full = GateTrainer(ex, bucket, spair_pairs, tmp_path / "full", config, progress=False, log=lambda _: None,
                       features_dir=cache)
    assert len(full.pool) == 6  # 5 good pairs + one with a keypoint outside (dropped); bad images skipped, counted
    assert full.skipped == {"image cannot be decoded": 1, "image file missing": 1,
                            "image size differs from its annotation": 1}
    files = list(next(cache.iterdir()).glob("*.safetensors"))
    assert len(files) == 5 and all(v.dtype == torch.float16 for v in read_safetensors(files[0]).values())
    before = full.mean_loss()
    summary = full.run()
    assert summary["steps"] == 24 and full.mean_loss() < 0.7 * before
    final = read_safetensors(tmp_path / "full" / "gate.safetensors")
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))

    half = GateTrainer(ex, bucket, spair_pairs, tmp_path / "split", dataclasses_replace(config, epochs=2),
                       progress=False, log=lambda _: None, features_dir=cache)
    half.run()
    with pytest.raises(ValueError, match="already holds GATE checkpoints"):
        GateTrainer(ex, bucket, spair_pairs, tmp_path / "split", config, progress=False, log=lambda _: None,
                    features_dir=cache)
    with pytest.raises(ValueError, match="the run changed"):
        GateTrainer(ex, bucket, spair_pairs, tmp_path / "split", dataclasses_replace(config, lr=1e-3), resume=True,
                    progress=False, log=lambda _: None, features_dir=cache)
    resumed = GateTrainer(ex, bucket, spair_pairs, tmp_path / "split", config, resume=True, progress=False,
                          log=lambda _: None, features_dir=cache)
    assert resumed.step == 12
    resumed.run()
    again = read_safetensors(tmp_path / "split" / "gate.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_gate_features_feed_the_evaluation_runner(fresh_base, models, spair_pairs, tmp_path):
    from cleandift_rt.evaluation.runner import evaluate
    from cleandift_rt.gate.source import GateFeatures, RecipeFeatures
    from cleandift_rt.gate.train import GateTrainConfig, GateTrainer

    bucket = _small_bucket(models)
    ex = GateExtractor.for_bucket(bucket, fresh_base, size=SIZE)
    trainer = GateTrainer(ex, bucket, spair_pairs, tmp_path / "run", GateTrainConfig(epochs=1, max_pairs=2, size=SIZE),
                          progress=False, log=lambda _: None)
    trainer.run()
    source = GateFeatures.from_dir(tmp_path / "run", base=fresh_base)
    pair = trainer.pool[0]
    image = __import__("PIL.Image", fromlist=["Image"]).open(pair.source[0]).convert("RGB")
    got = source.features(image, pair.source[1])
    assert got.shape == (ex.conv_channels + 154, 16, 16)
    conv, attention = trainer.store.load(*pair.source)  # the cached features through the trained model
    with torch.no_grad():
        expected = trainer.model.eval()(conv[None], attention[None])[0][0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    run = evaluate(spair_pairs[:3], source, progress=False)
    assert len(run.results) >= 1 and run.source["method"] == "gate"
    plain = RecipeFeatures(ex, GateRecipe(prompt="a photo of a {category}"))  # the paper's one-feature baseline row
    torch.testing.assert_close(plain.features(image, pair.source[1]), conv[0], atol=2e-3, rtol=2e-3)  # fp16 cache
    assert RecipeFeatures(ex, GateRecipe(controlnet="canny")).key != plain.key
    assert evaluate(spair_pairs[:3], plain, progress=False).source["method"] == "gate-recipe"


# -- the commands -----------------------------------------------------------------------------------


def test_content_shift_command(tiny_base_dir, models, photos, tmp_path, capsys):
    from PIL import Image

    from cleandift_rt.cli.main import main

    image = tmp_path / "cat.jpg"
    photos["cat"].save(image)
    out = tmp_path / "shift"
    assert main(["content-shift", str(image), "--base", str(tiny_base_dir), "--controlnet", str(models["controlnet"]),
                 "--lora", str(models["lora"]), "--prompt", "a photo of a cat, high quality", "--size", str(SIZE),
                 "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "content_shift.json").read_text())
    names = [r["technique"] for r in doc["scores"]]
    assert names == ["baseline (anchor)", "prompt", "controlnet", "lora pytorch_lora_weights", "all"]
    assert doc["scores"][0]["score"] == 0.0 and all(np.isfinite(r["score"]) for r in doc["scores"])
    assert all(name in printed for name in names)
    picture = Image.open(out / "img2img.png")
    assert picture.width == 6 * SIZE and picture.height > SIZE  # input, reference, 4 techniques (+ labels)
    assert np.asarray(picture)[:SIZE, SIZE:2 * SIZE].std() > 0  # the reference generation is not blank
    assert main(["content-shift", str(image), "--base", str(tiny_base_dir), "--out", str(out)]) == 2
    assert "at least one technique" in capsys.readouterr().err


def test_train_gate_command(tiny_base_dir, models, spair, tmp_path, capsys):
    from cleandift_rt.cli.main import main

    bucket = tmp_path / "bucket.json"
    bucket.write_text(json.dumps({"format": "cleandift-gate-bucket", "version": 1, "loras": {"style": str(models["lora"])},
                                  "conv": [{"prompt": "a photo of a {category}"}, {"lora": "style"}],
                                  "attention": {"prompt": "a {category}"}}))
    out = tmp_path / "gate"
    args = ["train-gate", "--root", str(spair["root"]), "--base", str(tiny_base_dir), "--bucket", str(bucket),
            "--out", str(out), "--split", "test", "--size", str(SIZE), "--pairs", "2", "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "gate.safetensors").is_file() and "MB per image" in capsys.readouterr().out
    assert main(args) == 2  # checkpoints present: refuses to start over
    assert "--resume" in capsys.readouterr().err
    assert main(args[:-3] + ["--epochs", "2", "--resume", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    results = tmp_path / "gate-pck.json"  # the trained model through the evaluation: eval-spair --gate
    assert main(["eval-spair", "--root", str(spair["root"]), "--gate", str(out), "--out", str(results),
                 "--limit", "1", "--no-progress"]) == 0
    doc = json.loads(results.read_text())
    assert doc["protocol"]["gate"] == str(out) and doc["counts"]["pairs"] >= 1 and "bbox" in doc["pck"]
    assert main(["eval-spair", "--root", str(spair["root"]), "--gate", str(out), "--engine", "x.onnx",
                 "--out", str(results)]) == 2
    assert "runs on its own" in capsys.readouterr().err
