"""Hostile or corrupted engine files (.onnx metadata, external data, .plan headers): named, never used."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from cleandift_rt import Engine
from cleandift_rt.formats.artifact import META_PREFIX, describe, read_onnx_info
from cleandift_rt.formats.plan import decode_array, encode_array


def _with_meta(src, dst, **fields):
    model = onnx.load(str(src))
    for entry in model.metadata_props:
        key = entry.key[len(META_PREFIX):]
        if key in fields:
            entry.value = json.dumps(fields[key])
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("fields, message", [
    ({"timestep": float("nan")}, r"metadata timestep must be finite"),
    ({"timestep": 1e9}, r"metadata timestep must be finite .* \[0, 999\]"),
    ({"prompt_tokens": 10**9}, r"prompt_tokens = 1000000000 must be an integer in \[1, 1024\]"),
    ({"cross_attention_dim": -3}, r"cross_attention_dim = -3"),
    ({"batch": {"min": 1, "opt": 1, "max": 10**9}}, r"batch.max"),
    ({"height": 100, "width": 128, "default_size": [100, 128]}, "not a multiple of 64"),
    ({"height": 10**6, "width": 128}, r"height = 1000000 must be an integer in \[64, 8192\]"),
    ({"block_out_channels": [32, 64, 64, 10**7]}, r"block_out_channels\[3\]"),
    ({"scaling_factor": float("inf")}, "scaling_factor"),
    ({"resize": "explode"}, "resize"),
])
def test_hostile_onnx_metadata_is_named_before_any_session(tiny_onnx, tmp_path, fields, message):
    bad = _with_meta(tiny_onnx["full"], tmp_path / "bad.onnx", **fields)
    with pytest.raises(ValueError, match=message):
        read_onnx_info(bad)
    with pytest.raises(ValueError, match=message):
        Engine(bad)
    with pytest.raises(ValueError, match=message):
        describe(bad)


def test_a_tap_recorded_with_the_wrong_shape_is_refused(tiny_onnx, tmp_path):
    taps = read_onnx_info(tiny_onnx["full"]).taps
    taps[6] = dict(taps[6], channels=taps[6]["channels"] * 1000)
    bad = _with_meta(tiny_onnx["full"], tmp_path / "bad.onnx", taps=taps)
    with pytest.raises(ValueError, match="tap us6 is recorded as"):
        Engine(bad)


def test_external_data_outside_the_folder_is_said_first(tiny_onnx, tmp_path):
    src = tiny_onnx["subset"]  # the one with external weights
    inner = tmp_path / "models"
    inner.mkdir()
    model = onnx.load(str(src), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../" + entry.value
    onnx.save(model, str(inner / "escaping.onnx"))
    shutil.copy(src.with_name(src.name + ".data"), tmp_path / (src.name + ".data"))
    d = describe(inner / "escaping.onnx")
    assert any("outside the model's folder" in w for w in d["warnings"])
    from cleandift_rt.cli.info import format_info

    assert "WARNING: external data" in format_info(d)
    with pytest.raises(ValueError, match="outside the model's folder"):
        Engine(inner / "escaping.onnx", backend="onnxruntime")


@pytest.mark.parametrize("blob, message", [
    ({"dtype": "object", "shape": [1], "base64": ""}, "is not"),
    ({"dtype": "float32", "shape": [10**9, 10**9], "base64": ""}, "implausibly large"),
    ({"dtype": "float32", "shape": [2, 2], "base64": "AAAA"}, "holds 3 bytes"),
    ({"dtype": "float32", "shape": [1], "base64": "!!!!"}, "not valid base64"),
    ({"dtype": "float32", "shape": [True], "base64": ""}, "is not"),
])
def test_plan_header_arrays_are_checked_before_they_are_built(blob, message):
    with pytest.raises(ValueError, match=message):
        decode_array(blob)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(decode_array(encode_array(a)), a)
