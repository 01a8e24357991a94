"""Issue 29, class 2: non-finite values never pass through silently.

Weights are checked finite where a model is loaded or exported (the error names the first bad
tensor); every backend's outputs once per Engine call (the error names the first tap that went
NaN or Inf); ``project`` refuses a NaN conditioning and the refinement a NaN or infinite
temperature.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from cleandift_rt import Engine, ProjectionHeads, match, project
from cleandift_rt.models import Student, load_student, save_student_unet
from cleandift_rt.runtime.backends.common import check_finite_outputs

CLEAR = (ValueError, TypeError)
PROFILE = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
pytestmark = pytest.mark.usefixtures("one_thread")


def _poisoned(unet):
    bad = copy.deepcopy(unet)
    with torch.no_grad():
        bad.conv_in.weight[0, 0, 0, 0] = float("nan")
    return bad


def test_a_student_with_a_nan_weight_is_named_at_load(tmp_path, tiny_student, tiny_base_dir):
    path = tmp_path / "nan_student.safetensors"
    save_student_unet(path, _poisoned(tiny_student.unet), 261.0)
    with pytest.raises(ValueError, match=r"tensor 'conv_in.weight' holds 1 NaN or Inf value"):
        load_student(path)
    with pytest.raises(ValueError, match="conv_in.weight"):  # the PyTorch backend reads it the same way
        Engine(path, base=str(tiny_base_dir), size=(64, 64))


def test_a_student_with_a_nan_weight_is_named_at_export(tmp_path, tiny_student, tiny_base):
    from cleandift_rt.export.onnx_export import export_onnx

    student = Student(unet=_poisoned(tiny_student.unet), timestep=261.0, source="nan.safetensors")
    with pytest.raises(ValueError, match=r"the model to export .*'unet.conv_in.weight'"):
        export_onnx(student, tiny_base, tmp_path / "nan.onnx", size=(64, 64), log=lambda *_: None)
    assert not (tmp_path / "nan.onnx").exists()


def test_an_engine_that_computes_nan_names_the_first_tap(tiny_onnx, tmp_path, batch):
    model = onnx.load(str(tiny_onnx["full"]))
    for init in model.graph.initializer:  # every weight of the graph poisoned in one place
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1 and init.name != "prompt_embeds":
            array = array.copy()
            array.flat[0] = np.nan
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    bad = tmp_path / "nan.onnx"
    onnx.save(model, str(bad))
    engine = Engine(bad)
    with pytest.raises(ValueError, match=r"computed NaN or Inf in 'mid'"):
        engine.extract([batch[0]])


def test_the_output_check_names_the_tap_and_passes_finite_outputs():
    good = {"us3": torch.zeros(1, 2, 4, 4), "us6": torch.ones(1, 2, 2, 2)}
    assert check_finite_outputs(good, "x") is good
    bad = dict(good, us6=torch.tensor([[[[1.0, float("inf")]]]]))
    with pytest.raises(ValueError, match=r"NaN or Inf in 'us6'"):
        check_finite_outputs(bad, "x")


HEADS = ProjectionHeads({"us6": 16}).eval()


@PROFILE
@given(dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
       poison=st.sampled_from([None, "nan", "inf", "-inf"]), where=st.integers(0, 2 * 256 - 1))
def test_project_refuses_a_nan_or_non_float_conditioning(tally, dtype, poison, where):
    cond = HEADS.cond(torch.tensor([100.0, 700.0])).detach()
    if poison:
        cond.view(-1)[where] = float(poison)
    cond = cond.to(dtype)
    feats = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(where))
    try:
        out = project(feats, cond, HEADS, "us6")
    except CLEAR:
        tally.clear_error()
        return
    assert dtype.is_floating_point and poison is None and torch.isfinite(out).all()
    tally.checked_result()


@PROFILE
@given(temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3),
                             st.sampled_from([0.02, 1e-6, 5.0])),
       window=st.one_of(st.integers(-3, 400), st.booleans(), st.floats(0, 20), st.sampled_from([100001, 10**12])))
def test_refinement_refuses_bad_temperatures_and_windows(tally, temperature, window):
    gen = torch.Generator().manual_seed(3)
    src, dst = torch.randn(1, 8, 5, 6, generator=gen), torch.randn(1, 8, 6, 7, generator=gen)
    try:
        xy, _ = match(src, dst, coords="feature", refine=True, window=window, temperature=temperature)
    except CLEAR:
        tally.clear_error()
        return
    assert isinstance(temperature, float) and math.isfinite(temperature) and temperature > 0
    assert not isinstance(window, bool) and float(window).is_integer() and window % 2 == 1 and 1 <= window <= 255
    assert torch.isfinite(xy).all() and (xy[..., 0] <= 6).all() and (xy[..., 1] <= 5).all()
    tally.checked_result()
