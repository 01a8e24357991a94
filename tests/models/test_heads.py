"""Projection heads and time mapping: release names, identity at init, the formula of docs/method.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cleandift_rt import TAPS, ProjectionHeads
from cleandift_rt.checkpoint import write_safetensors
from cleandift_rt.models.heads import build_heads
from cleandift_rt.taps import tap_channels
from random_heads import random_heads

SD21 = [320, 640, 1280, 1280]


def test_release_parameter_names_and_count():
    heads = build_heads([32, 64, 64, 64])
    names = set(heads.state_dict())
    assert "time_emb.weight" in names and "time_in_proj.weight" in names
    assert {"mapping.in_norm.scale", "mapping.out_norm.scale", "mapping.blocks.1.up_proj.weight",
            "mapping.blocks.1.down_proj.weight", "mapping.blocks.0.norm.scale"} <= names
    for tap in TAPS:
        for j in range(3):
            for leaf in ("norm.linear.weight", "up_proj.weight", "down_proj.weight"):
                assert f"adapters.{tap}.layers.{j}.{leaf}" in names
    assert heads.state_dict()["time_emb.weight"].shape == (128, 1)
    # docs/method.md: 9 D^2 + 768 D per head.
    for tap, d in tap_channels([32, 64, 64, 64]).items():
        n = sum(p.numel() for p in heads.adapters[tap].parameters())
        assert n == 9 * d * d + 768 * d


def test_sd21_head_size_matches_spec():
    with torch.device("meta"):
        heads = build_heads(SD21)
    total = sum(p.numel() for p in heads.adapters.parameters())
    assert abs(total / 1e6 - 123.8) < 0.2
    assert sum(p.numel() for p in heads.adapters["us6"].parameters()) == 9 * 1280**2 + 768 * 1280


def test_identity_at_init():
    heads = build_heads([32, 64, 64, 64])
    for tap, c in tap_channels([32, 64, 64, 64]).items():
        x = torch.randn(2, c, 3, 5)
        assert torch.equal(heads(tap, x, 261), x)
        assert torch.equal(heads(tap, x, torch.tensor([10, 900])), x)


def _reference_head(state, tap, x, t, conditioning="adarms"):
    """docs/method.md, projection heads written out with plain tensor math (no modules); ``"film"``: the paper's
    x * (1 + scale(cond)) + shift(cond) in place of the AdaRMS norm."""
    def rms(v, scale):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    def swiglu(v):
        a, g = v.chunk(2, -1)
        return a * F.silu(g)

    f = 2 * math.pi * (t[:, None] / 999) @ state["time_emb.weight"].T
    c = torch.cat([f.cos(), f.sin()], -1) @ state["time_in_proj.weight"].T
    c = rms(c, state["mapping.in_norm.scale"])
    for i in range(2):
        p = f"mapping.blocks.{i}."
        c = c + swiglu(rms(c, state[p + "norm.scale"]) @ state[p + "up_proj.weight"].T) @ state[p + "down_proj.weight"].T
    c = rms(c, state["mapping.out_norm.scale"])
    b, d, h, w = x.shape
    y = x.flatten(2).transpose(1, 2)
    for j in range(3):
        p = f"adapters.{tap}.layers.{j}."
        if conditioning == "adarms":
            z = rms(y, (1 + c @ state[p + "norm.linear.weight"].T)[:, None, :])
        else:
            film = state[p + "film.linear.weight"]
            z = y * (1 + c @ film[:d].T)[:, None, :] + (c @ film[d:].T)[:, None, :]
        y = y + swiglu(z @ state[p + "up_proj.weight"].T) @ state[p + "down_proj.weight"].T
    return y.transpose(1, 2).reshape(b, d, h, w)


def test_matches_spec_formula(tiny_student):
    heads = tiny_student.heads
    state = heads.state_dict()
    t = torch.tensor([0.0, 261.0, 999.0])
    for tap in ("mid", "us6", "us10"):
        x = torch.randn(3, heads.tap_channels[tap], 4, 4)
        got = heads(tap, x, t)
        ref = _reference_head(state, tap, x, t)
        assert not torch.allclose(got, x)  # trained-like heads are not the identity
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_from_release_reads_full_file(tmp_path, tiny_student):
    state = dict(tiny_student.heads.state_dict())
    state["unet_feature_extractor_cleandift.conv_in.weight"] = torch.zeros(2, 2)  # extra keys are fine
    state["timestep"] = torch.tensor(261.0)
    write_safetensors(tmp_path / "x_full.safetensors", state)
    heads = ProjectionHeads.from_release(tmp_path / "x_full.safetensors")
    x = torch.randn(1, heads.tap_channels["us6"], 2, 2)
    torch.testing.assert_close(heads("us6", x, 300), tiny_student.heads("us6", x, 300), rtol=0, atol=0)


def test_from_release_errors(tmp_path, tiny_student):
    state = dict(tiny_student.heads.state_dict())
    del state["adapters.us6.layers.1.up_proj.weight"]
    write_safetensors(tmp_path / "missing.safetensors", state)
    with pytest.raises(ValueError, match="missing keys: adapters.us6.layers.1.up_proj.weight"):
        ProjectionHeads.from_release(tmp_path / "missing.safetensors")
    write_safetensors(tmp_path / "unet_only.safetensors", {"conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="holds no projection heads"):
        ProjectionHeads.from_release(tmp_path / "unet_only.safetensors")
    state = dict(tiny_student.heads.state_dict())
    state["adapters.us6.layers.0.up_proj.weight"] = torch.zeros(3, 3)
    write_safetensors(tmp_path / "shape.safetensors", state)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        ProjectionHeads.from_release(tmp_path / "shape.safetensors")


def test_bad_calls(tiny_student):
    heads = tiny_student.heads
    x = torch.randn(2, heads.tap_channels["us6"], 2, 2)
    with pytest.raises(ValueError, match="no projection head for tap 'us99'"):
        heads("us99", x, 1)
    with pytest.raises(ValueError, match="channels"):
        heads("us10", x, 1) if heads.tap_channels["us10"] != x.shape[1] else heads("us6", x[:, :1], 1)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        heads("us6", x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        heads("us6", x, float("nan"))
    with pytest.raises(ValueError, match="B x C x h x w"):
        heads("us6", x[0], 1)


def test_half_precision_heads(tiny_student):
    import copy

    heads = copy.deepcopy(tiny_student.heads).to(torch.bfloat16)
    x = torch.randn(2, heads.tap_channels["us6"], 3, 3)
    got = heads("us6", x.bfloat16(), torch.tensor([5.0, 700.0]))
    ref = tiny_student.heads("us6", x, torch.tensor([5.0, 700.0]))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# FiLM heads (paper appendix E): scale and shift, no normalisation


def test_film_names_shapes_and_identity_at_init():
    heads = build_heads([32, 64, 64, 64], conditioning="film")
    assert heads.conditioning == "film" and build_heads([32, 64, 64, 64]).conditioning == "adarms"
    state = heads.state_dict()
    assert not any(".norm.linear." in k for k in state)
    for tap, d in tap_channels([32, 64, 64, 64]).items():
        for j in range(3):
            assert state[f"adapters.{tap}.layers.{j}.film.linear.weight"].shape == (2 * d, 256)
        assert sum(p.numel() for p in heads.adapters[tap].parameters()) == 9 * d * d + 3 * 512 * d
        x = torch.randn(2, d, 3, 5) * 4 + 1  # not zero-mean, not unit-RMS: FiLM must not normalise
        assert torch.equal(heads(tap, x, 261), x)
        assert torch.equal(heads(tap, x, torch.tensor([10, 900])), x)
    with pytest.raises(ValueError, match="head_conditioning 'adaln' is not one of adarms, film"):
        build_heads([32, 64, 64, 64], conditioning="adaln")


def test_film_matches_an_independent_transcription():
    heads = random_heads(tap_channels([32, 64, 64, 64]), conditioning="film")
    state = heads.state_dict()
    t = torch.tensor([0.0, 261.0, 999.0])
    for tap in ("mid", "us6", "us10"):
        x = torch.randn(3, heads.tap_channels[tap], 4, 4) * 3
        got, ref = heads(tap, x, t), _reference_head(state, tap, x, t, "film")
        # unnormalised activations grow with x: the tolerance is relative to the largest value
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        # a scale-only reading of the same weights (AdaRMS-like, or FiLM without its shift) differs
        assert (got - _reference_head({**state, **{k.replace("film.linear", "norm.linear"): v[:v.shape[0] // 2]
                                                   for k, v in state.items() if "film.linear" in k}},
                                      tap, x, t)).abs().max() > 1e-2


def test_film_round_trips_through_full_files(tmp_path, tiny_base):
    from cleandift_rt.models import load_student, save_student_full

    film = random_heads(tap_channels(tiny_base.block_out_channels), seed=3, conditioning="film")
    save_student_full(tmp_path / "film_full.safetensors", tiny_base.unet, film, 261.0)
    heads = ProjectionHeads.from_release(tmp_path / "film_full.safetensors")
    assert heads.conditioning == "film"
    x = torch.randn(2, heads.tap_channels["us6"], 3, 3)
    torch.testing.assert_close(heads("us6", x, 300), film("us6", x, 300), rtol=0, atol=0)
    assert load_student(tmp_path / "film_full.safetensors").heads.conditioning == "film"

    adarms = random_heads(tap_channels(tiny_base.block_out_channels), seed=3)
    write_safetensors(tmp_path / "adarms.safetensors", adarms.state_dict())
    assert ProjectionHeads.from_release(tmp_path / "adarms.safetensors").conditioning == "adarms"

    mixed = dict(film.state_dict())
    w = mixed.pop("adapters.us6.layers.1.film.linear.weight")
    mixed["adapters.us6.layers.1.norm.linear.weight"] = w[:w.shape[0] // 2].contiguous()
    write_safetensors(tmp_path / "mixed.safetensors", mixed)
    with pytest.raises(ValueError, match="mixes AdaRMS .* and FiLM"):
        ProjectionHeads.from_release(tmp_path / "mixed.safetensors")
    truncated = dict(film.state_dict())
    truncated["adapters.us6.layers.0.film.linear.weight"] = w[:w.shape[0] // 2].contiguous()  # a D-row (AdaRMS) shape
    write_safetensors(tmp_path / "truncated.safetensors", truncated)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        ProjectionHeads.from_release(tmp_path / "truncated.safetensors")
