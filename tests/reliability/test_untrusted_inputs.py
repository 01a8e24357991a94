"""Untrusted metadata and bad timesteps: a clear error before anything is built, never garbage."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from cleandift_rt import ProjectionHeads, project, unet_taps
from cleandift_rt.checkpoint import read_safetensors, write_safetensors
from cleandift_rt.models import load_student, save_student_unet
from cleandift_rt.models.config_check import check_unet_config
from cleandift_rt.timesteps import check_timestep, check_unet_timestep


def _with_metadata(tmp_path, student, **changes):
    """A copy of the tiny student's _unet file whose metadata is rewritten (the tensors unchanged)."""
    good = tmp_path / "good.safetensors"
    save_student_unet(good, student.unet, 261.0)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["unet_config"])
    for key, value in changes.items():
        if key == "timestep":
            meta["timestep"] = value
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    meta["unet_config"] = json.dumps(config)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, read_safetensors(good), meta)
    return bad


@pytest.mark.parametrize("changes, message", [
    ({"layers_per_block": 100000}, r"layers_per_block 100000 outside \[0, 16\]"),
    ({"block_out_channels": [10**6, 64, 64, 64]}, "block_out_channels"),
    ({"cross_attention_dim": 10**5}, r"cross_attention_dim 100000 outside"),
    ({"cross_attention_dim": 10**7}, "not a plausible number"),
    ({"evil_key": 1}, "keys UNet2DConditionModel does not take"),
    ({"down_block_types": ["Boom2D"] * 4}, "must name 4 diffusers blocks"),
    ({"norm_eps": float("nan")}, "not a plausible number"),
    ({"block_out_channels": [32, 64, 64, 128]}, "mis-shaped keys"),  # plausible, but not what the tensors are
    ({"timestep": "nan"}, r"student timestep must be finite \(not NaN or Inf\) and in \[0, 999\]"),
    ({"timestep": "1e9"}, r"must be finite .* in \[0, 999\]"),
    ({"timestep": "soon"}, "is not a number"),
])
def test_hostile_student_metadata_is_refused_before_any_module(tmp_path, tiny_student, monkeypatch, changes,
                                                                message):
    import diffusers

    built = []
    real_init = diffusers.UNet2DConditionModel.__init__

    @functools.wraps(real_init)  # keeps the signature the config check reads
    def counting_init(self, *args, **kwargs):
        built.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "__init__", counting_init)
    bad = _with_metadata(tmp_path, tiny_student, **changes)
    with pytest.raises(ValueError, match=message):
        load_student(bad)
    # bounds violations never reach the constructor; shape mismatches only its meta-device form
    assert len(built) <= 1 and ("layers_per_block" not in changes or not built)


def test_a_good_file_still_loads_exactly(tmp_path, tiny_student):
    path = tmp_path / "s.safetensors"
    save_student_unet(path, tiny_student.unet, 261.0)
    back = load_student(path)
    pairs = zip(back.unet.state_dict().values(), tiny_student.unet.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not any(p.is_meta for p in back.unet.parameters())


def test_config_checks_name_the_key():
    with pytest.raises(ValueError, match="must be a JSON object"):
        check_unet_config([1, 2], "f")
    with pytest.raises(ValueError, match="block_out_channels"):
        check_unet_config({"block_out_channels": [True, 64]}, "f")
    with pytest.raises(ValueError, match="entries"):
        check_unet_config({"block_out_channels": [32] * 40}, "f")


@pytest.mark.parametrize("bad", [True, float("nan"), float("inf"), -1, 1000, 1e9, "261", None, [],
                                 torch.tensor([1.0, float("nan")])])
def test_head_timesteps_are_checked_where_they_enter(bad):
    with pytest.raises((ValueError, TypeError)):
        check_timestep(bad)


def test_heads_and_project_refuse_bad_timesteps_and_keep_fractions():
    torch.manual_seed(0)
    heads = ProjectionHeads({"us6": 8}).eval()
    feats = torch.randn(1, 8, 3, 3)
    for bad in (True, -1, 1000, 1e9, float("nan")):
        with pytest.raises((ValueError, TypeError)):
            heads("us6", feats, bad)
        with pytest.raises((ValueError, TypeError)):
            project(feats, bad, heads, "us6")
    a, b = heads.cond(261.5), heads.cond(261.0)
    assert not torch.equal(a, b)  # fractions are kept, not rounded
    assert torch.isfinite(heads("us6", feats, 0)).all() and torch.isfinite(heads("us6", feats, 999)).all()


def test_unet_timesteps_finite_and_minus_one_allowed(tiny_base):
    latents = torch.randn(1, 4, 8, 8)
    embeds = torch.zeros(1, 77, tiny_base.unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="finite"):
        unet_taps(tiny_base.unet, latents, float("nan"), embeds, taps=["mid"])
    with pytest.raises(TypeError, match="boolean"):
        unet_taps(tiny_base.unet, latents, True, embeds, taps=["mid"])
    out = unet_taps(tiny_base.unet, latents, -1, embeds, taps=["mid"])  # the hyperfeatures one-step call
    assert torch.isfinite(out["mid"]).all()
    assert check_unet_timestep(-1) == -1 and math.isfinite(check_unet_timestep(np.float32(0.5)))


@pytest.mark.parametrize("latents, embeds, message", [
    (torch.randn(1, 3, 8, 8), torch.zeros(1, 77, 32), "this U-Net takes B x 4 x h x w"),
    (torch.randn(1, 4, 12, 8), torch.zeros(1, 77, 32), "multiples of 8"),
    (torch.randn(4, 8, 8), torch.zeros(1, 77, 32), "latents must be"),
    (torch.randn(2, 4, 8, 8), torch.zeros(1, 77, 32), r"encoder_hidden_states must be \[2, L, 32\]"),
    (torch.randn(1, 4, 8, 8), torch.zeros(1, 77, 16), r"\[1, L, 32\]"),
])
def test_unet_shape_errors_are_clear(tiny_base, latents, embeds, message):
    with pytest.raises(ValueError, match=message):
        unet_taps(tiny_base.unet, latents, 261, embeds, taps=["us6"])


def test_a_zero_size_target_box_is_skipped_and_named_not_scored(tmp_path):
    from cleandift_rt.evaluation.pairs import load_pairs_json

    entry = {"source": "a.jpg", "target": "b.jpg", "source_points": [[1, 2]], "target_points": [[3, 4]]}
    doc = {"pairs": [dict(entry, target_bbox=[5, 5, 5, 5]), dict(entry, target_bbox=[0, 0, 0, 9])]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(doc))
    pairs, skips = load_pairs_json(path, tmp_path)
    assert len(pairs) == 1 and pairs[0].target_bbox == (0.0, 0.0, 0.0, 9.0)  # a thin box still has a size
    reason = next(iter(skips.pairs))
    assert skips.pairs[reason] == 1 and any("zero size" in e for e in skips.examples[reason])


def test_image_names_the_file_system_cannot_look_up_are_skipped_and_named(tmp_path):
    """Found by bench/fuzz.py: os.stat raises OSError (not "missing") on a 300-byte name, which
    escaped load_pf_csv's per-row handling and ended the evaluation."""
    from cleandift_rt.evaluation.pairs import load_pairs_json, load_pf_csv

    long_name, nul_name = "a" * 300 + ".jpg", "a\x00.jpg"
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("source_image,target_image,class,XA,YA,XB,YB\n"
                        f"{long_name},b.jpg,1,1;2,3;4,5;6,7;8\n"
                        f"b.jpg,{nul_name},1,1;2,3;4,5;6,7;8\n"
                        "a.jpg,b.jpg,1,1;2,3;4,5;6,7;8\n")
    pairs, skips = load_pf_csv(csv_path, tmp_path)
    assert [p.source.name for p in pairs] == ["a.jpg"]
    examples = " ".join(skips.examples["malformed CSV row"])
    assert "file systems allow 255" in examples and "NUL byte" in examples

    entry = {"target": "b.jpg", "source_points": [[1, 2]], "target_points": [[3, 4]]}
    json_path = tmp_path / "pairs.json"
    json_path.write_text(json.dumps([dict(entry, source=long_name), dict(entry, source=nul_name),
                                     dict(entry, source="x/" * 2100 + "a.jpg"), dict(entry, source="a.jpg")]))
    pairs, skips = load_pairs_json(json_path, tmp_path)
    assert len(pairs) == 1 and skips.pairs["malformed pair"] == 3
    assert any("4095" in e for e in skips.examples["malformed pair"])
