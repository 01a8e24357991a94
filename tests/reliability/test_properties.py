"""Property tests over the public API's inputs: a clear error or a correct result, never garbage.

"Clear error" means ValueError or TypeError (FileNotFoundError for paths) raised by our checks;
"correct" means the documented shape, range and finiteness. Anything else (an IndexError, a
RuntimeError from deep inside torch, NaN from finite input) fails. Hypothesis derandomised: the
same examples run in CI every time.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleandift_rt import ProjectionHeads, match, project
from cleandift_rt.features.preprocess import prepare_images
from cleandift_rt.formats.artifact import ArtifactInfo
from cleandift_rt.models.config_check import check_unet_config
from cleandift_rt.models import configs

CLEAR = (ValueError, TypeError)
PROFILE = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8)
                           | st.floats(allow_nan=True, allow_infinity=True),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=8)


@PROFILE
@given(h=st.integers(1, 150), w=st.integers(1, 150), c=st.integers(1, 5),
       dtype=st.sampled_from(["uint8", "uint16", "float32", "float64", "int64", "bool"]),
       special=st.sampled_from([None, "nan", "inf", "big"]), policy=st.sampled_from(["stretch", "pad"]),
       layout=st.sampled_from(["hwc", "nchw", "list"]))
def test_prepare_images_clear_error_or_pixels_in_range(tally, h, w, c, dtype, special, policy, layout):
    rng = np.random.default_rng(h * 1000 + w + c)
    if dtype == "uint8":
        array = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    elif dtype in ("float32", "float64"):
        array = rng.uniform(-1, 1, (h, w, c)).astype(dtype)
    else:
        array = rng.integers(0, 2, (h, w, c)).astype(dtype)
    if special and array.dtype.kind == "f":
        array.flat[0] = {"nan": np.nan, "inf": np.inf, "big": 1e6}[special]
    if layout == "nchw":
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0)[None])
    images = [array] if layout == "list" else array
    try:
        prepared = prepare_images(images, (64, 128), policy)
    except CLEAR:
        tally.clear_error()
        return
    pixels = prepared.pixels
    assert pixels.shape == (1, 3, 64, 128) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all() and pixels.abs().max() <= 1.0 + 1e-6
    tally.checked_result()


@PROFILE
@given(b=st.integers(0, 2), n=st.integers(0, 30), m=st.integers(0, 30), c=st.integers(0, 20),
       c2=st.sampled_from([None, 3]), k=st.integers(-1, 6), mutual=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]),
       poison=st.sampled_from([None, "nan", "inf"]), allow=st.booleans(),
       precision=st.sampled_from([None, "fp32", "bf16", "fp64"]))
def test_match_clear_error_or_valid_neighbours(tally, b, n, m, c, c2, k, mutual, dtype, poison, allow, precision):
    gen = torch.Generator().manual_seed(b * 100 + n * 10 + m + c)
    src = torch.randn(b, n, c, generator=gen).to(dtype)
    dst = torch.randn(b, m, c2 if c2 is not None else c, generator=gen).to(dtype)
    if poison and src.numel() and dtype.is_floating_point:
        src.view(-1)[0] = float(poison)
    try:
        index, sim = match(src, dst, k=k, mutual=mutual, allow_nonfinite=allow, precision=precision)
    except CLEAR:
        tally.clear_error()
        return
    index, sim = index.reshape(b, n, -1), sim.reshape(b, n, -1)
    assert index.dtype == torch.int64 and ((index >= -1) & (index < m)).all()
    finite_input = poison is None
    if finite_input:
        assert torch.isfinite(sim).all() and (sim.abs() <= 1 + 1e-2).all()
    assert not (poison and not allow)  # non-finite input without allow_nonfinite must have raised
    tally.checked_result()


HEADS = ProjectionHeads({"us6": 16}).eval()


@PROFILE
@given(t=st.one_of(st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.none(), st.lists(st.floats(-5, 1100), min_size=1, max_size=3)),
       batch=st.integers(1, 3), shape=st.sampled_from(["ok", "channels", "rank"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_project_and_heads_clear_error_or_finite(tally, t, batch, shape, dtype):
    dims = {"ok": (batch, 16, 3, 4), "channels": (batch, 15, 3, 4), "rank": (batch, 16, 12)}[shape]
    feats = torch.randn(*dims, generator=torch.Generator().manual_seed(batch)).to(dtype)
    for call in (lambda: project(feats, t, HEADS, "us6"), lambda: HEADS("us6", feats, t)):
        try:
            with torch.no_grad():
                out = call()
        except CLEAR:
            tally.clear_error()
            continue
        assert shape == "ok" and out.shape == feats.shape and torch.isfinite(out).all()
        values = t if isinstance(t, list) else [t]
        assert all(not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 999 for v in values)
        tally.checked_result()


def _valid_artifact() -> dict:
    from cleandift_rt.formats.artifact import tap_records

    return ArtifactInfo(taps=tap_records(["us3", "us6"], [32, 64, 64, 64]), height=128, width=128, size_range=None,
                        default_size=[128, 128], resize="stretch", batch={"min": 1, "opt": 2, "max": 4},
                        base_model="b", variant="tiny", student="s", prompt="", timestep=261.0,
                        cross_attention_dim=32, prompt_tokens=77, block_out_channels=[32, 64, 64, 64],
                        scaling_factor=0.18215).to_dict()


VALID_ARTIFACT = _valid_artifact()


@PROFILE
@given(field=st.sampled_from(sorted(VALID_ARTIFACT)), value=JSON_VALUES, drop=st.booleans())
def test_engine_metadata_mutations_fail_only_with_value_errors(tally, field, value, drop):
    d = copy.deepcopy(VALID_ARTIFACT)
    if drop:
        d.pop(field)
    else:
        d[field] = value
    try:
        info = ArtifactInfo.from_dict(d, "mutated")
    except ValueError:
        tally.clear_error()
        return
    assert info.check_taps(None) == tuple(t["name"] for t in info.taps)  # a usable description
    tally.checked_result()


UNET_FIELDS = sorted(configs.unet_config("tiny"))


@PROFILE
@given(field=st.sampled_from(UNET_FIELDS + ["bogus"]), value=JSON_VALUES)
def test_unet_config_mutations_fail_only_with_value_errors(tally, field, value):
    config = configs.unet_config("tiny")
    config[field] = value
    try:
        checked = check_unet_config(config, "mutated")
    except ValueError:
        tally.clear_error()
        return
    assert isinstance(checked, dict)
    tally.checked_result()


@pytest.fixture(scope="module")
def engine(tiny_onnx):
    from cleandift_rt import Engine

    return Engine(tiny_onnx["full"], taps=["us6"])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["uint8-list", "uint8-batch", "float-nchw", "float-list", "pil", "odd"]),
       h=st.integers(1, 200), w=st.integers(1, 200))
def test_engine_extract_clear_error_or_finite_features(tally, engine, kind, h, w):
    from PIL import Image

    rng = np.random.default_rng(h * w)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    images = {"uint8-list": [rgb], "uint8-batch": rgb[None], "float-nchw": np.moveaxis(rgb, -1, 0)[None] / 127.5 - 1,
              "float-list": [rgb.astype(np.float32)], "pil": [Image.fromarray(rgb)], "odd": {"image": rgb}}[kind]
    try:
        feats = engine.extract(images)
    except CLEAR:
        tally.clear_error()
        return
    assert min(h, w) >= 64 and feats["us6"].shape[0] == 1 and np.isfinite(feats["us6"]).all()
    tally.checked_result()
