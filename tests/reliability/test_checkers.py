"""Issue 29, class 3: one set of checkers for integers, sizes, timesteps and finite floats.

A ``bool`` is never an integer, a float is never silently truncated, ``0`` is a size that is
refused (not "not given"), timesteps stay in [0, 999] and NaN never switches an option off, the
same way in the API, on the command line, in config files and overrides, and in file readers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleandift_rt import Engine, ProjectionHeads, match, project
from cleandift_rt.checks import check_float, check_int, check_size
from cleandift_rt.cli.main import main
from cleandift_rt.training.config import _BOOLS, _FLOATS, _INTS, TrainConfig, build_config

CLEAR = (ValueError, TypeError)
PROFILE = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
NUMBERS = st.one_of(st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=4), st.none(), st.just(np.int64(7)), st.just(np.float32(2.5)),
                    st.just(np.bool_(True)), st.lists(st.integers(), max_size=2))


@PROFILE
@given(value=NUMBERS, lo=st.sampled_from([None, 0, 1]), hi=st.sampled_from([None, 10, 10**6]))
def test_check_int_returns_the_exact_integer_or_a_clear_error(tally, value, lo, hi):
    try:
        got = check_int(value, "n", lo, hi)
    except CLEAR as exc:
        assert "n " in str(exc) or str(exc).startswith("n must")  # the field is named
        tally.clear_error()
        return
    assert type(got) is int and not isinstance(value, (bool, np.bool_)) and got == value  # nothing truncated
    assert (lo is None or got >= lo) and (hi is None or got <= hi)
    tally.checked_result()


@PROFILE
@given(value=NUMBERS, lo=st.sampled_from([None, 0.0]), open_=st.booleans())
def test_check_float_returns_a_finite_float_or_a_clear_error(tally, value, lo, open_):
    try:
        got = check_float(value, "x", lo, lo_open=open_)
    except CLEAR:
        tally.clear_error()
        return
    assert type(got) is float and math.isfinite(got) and not isinstance(value, (bool, np.bool_))
    assert lo is None or (got > lo if open_ else got >= lo)
    tally.checked_result()


JSON_VALUES = st.one_of(st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=4), st.none(), st.lists(st.floats(-1, 2), max_size=3))


@PROFILE
@given(field=st.sampled_from(sorted([*_INTS, *_FLOATS, *_BOOLS, "size", "student_timestep", "adam_betas"])),
       value=JSON_VALUES)
def test_config_overrides_are_checked_by_kind(tally, field, value):
    try:
        config = build_config(overrides={field: value})
    except CLEAR as exc:
        assert field in str(exc) and "flags and overrides" in str(exc)  # the field and where it came from
        tally.clear_error()
        return
    got = getattr(config, field)
    if field == "size" and value is None:
        assert got is None  # null: the base model's resolution
    elif field in _INTS or field == "size":
        assert type(got) is int and not isinstance(value, bool) and got == value
    elif field in _BOOLS:
        assert got is value
    elif field == "adam_betas":
        assert all(0 <= b <= 1 for b in got)
    else:
        assert type(got) is float and math.isfinite(got) and not isinstance(value, bool)
    tally.checked_result()


def test_the_issue_examples_are_refused_with_the_field_named(tmp_path):
    for values, message in [({"batch_size": True}, "batch_size must be an integer, got the boolean True"),
                            ({"warmup_steps": float("nan")}, "warmup_steps must be a whole number"),
                            ({"student_timestep": 5000}, r"student_timestep must be finite .* \[0, 999\]"),
                            ({"size": 0}, "size must be"), ({"lr": float("inf")}, "lr must be finite")]:
        with pytest.raises(CLEAR, match=message):
            build_config(overrides=values)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": "abc"}))
    with pytest.raises(TypeError, match=f"config file {path}: steps must be an integer, got str 'abc'"):
        build_config(config_file=path)
    assert TrainConfig(max_grad_norm=2).check().max_grad_norm == 2.0  # a whole number where a float goes is fine


def test_the_api_refuses_bools_and_truncation(subset_engine, tiny_onnx, batch, tmp_path):
    for kw, message in [({"max_batch": 2.7}, "max_batch must be a whole number"),
                        ({"max_batch": True}, "max_batch must be an integer"),
                        ({"threads": True}, "threads"), ({"size": (True, 768)}, "model input size"),
                        ({"size": (64.5, 64)}, "whole number")]:
        with pytest.raises(CLEAR, match=message):
            Engine(tiny_onnx["subset"], **kw)
    with pytest.raises(CLEAR, match="batch_size"):
        next(subset_engine.stream([batch[0]], batch_size=True))
    feats = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match=r"image_size=\(H, W\).*boolean"):
        match(feats, feats, coords="image", image_size=(True, 768))
    with pytest.raises(TypeError, match=r"t must be a number.*True"):  # a bool timestep tensor
        project(torch.randn(1, 16, 2, 2), torch.tensor([True]), ProjectionHeads({"us6": 16}), "us6")
    from cleandift_rt.extraction import collect_images, extract_local

    photo = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(batch[0]).save(photo)
    with pytest.raises(TypeError, match="batch_size must be an integer, got the boolean"):
        extract_local(subset_engine, collect_images([photo]), tmp_path / "o", batch_size=True, progress=False)


def test_a_plan_header_with_a_boolean_byte_count_is_corrupt(tmp_path):
    from cleandift_rt.formats.plan import PLAN_MAGIC, _PLAN_LENGTH, read_plan_header

    header = {"info": {}, "profile": {"batch": {}, "tokens": 77}, "default_prompt_embeds": {}, "engine_bytes": True}
    payload = json.dumps(header).encode()
    path = tmp_path / "x.plan"
    path.write_bytes(PLAN_MAGIC + _PLAN_LENGTH.pack(len(payload)) + payload + b"\x00")  # True == 1 engine byte
    with pytest.raises(ValueError, match="malformed: engine_bytes"):
        read_plan_header(path)


def test_size_zero_on_the_command_line_is_an_error_not_unset(tiny_onnx, tmp_path, capsys):
    for argv in (["extract", str(tmp_path), "--engine", str(tiny_onnx["subset"]), "--size", "0", "--out",
                  str(tmp_path / "o")],
                 ["train", "--base", "b", "--data", "d", "--out", str(tmp_path / "r"), "--size", "0"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "expected a whole number >= 1, got 0" in capsys.readouterr().err


def test_check_size_multiples():
    assert check_size(128, "s", 64) == 128
    with pytest.raises(ValueError, match="multiple of 64"):
        check_size(100, "s", 64)
