"""fp16 feature graphs with fp32 islands (export/mixed_precision.py): contract, policy, parity with fp32."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cleandift_rt.export.mixed_precision import (FLOAT, FLOAT16, PrecisionPolicy, attention_score_nodes,
                                                 convert_to_fp16, fp32_nodes, measure_ranges)
from cleandift_rt.export.onnx_export import check_onnx, fp32_reference_path, write_fp16_onnx
from cleandift_rt.formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, read_onnx_info
from cleandift_rt.runtime.engine import Engine
from cleandift_rt.taps import TAPS
from export_fixtures import SIZE, cosine


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _output_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}


def test_fp16_export_contract_and_metadata(tiny_fp16_onnx):
    check_onnx(tiny_fp16_onnx)  # checker + strict shape inference
    model = onnx.load(str(tiny_fp16_onnx))
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [(IMAGE_INPUT, FLOAT),
                                                                                   (EMBEDS_INPUT, FLOAT)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [(t, FLOAT) for t in TAPS]
    weights = [t for t in model.graph.initializer if t.name != EMBEDS_INPUT]
    half = sum(len(t.raw_data) for t in weights if t.data_type == FLOAT16)
    assert half / sum(len(t.raw_data) for t in weights) > 0.8, "the weights should be stored in fp16"
    types = _output_types(model)
    for t in (t for t in weights if t.data_type == FLOAT):  # fp32 weights belong to fp32 islands only
        consumers = [n for n in model.graph.node if t.name in n.input]
        assert consumers and all(types[n.output[0]] == FLOAT for n in consumers), t.name
    info = read_onnx_info(tiny_fp16_onnx)
    reference = fp32_reference_path(tiny_fp16_onnx)
    assert info.extra["precision"] == "fp16" and info.extra["fp32_reference"] == reference.name
    policy = info.extra["precision_policy"]
    assert policy["policy"] == PrecisionPolicy().to_dict() and policy["calibrated"]
    assert set(policy["fp32_nodes"]) >= {"attention_scores", "normalization", "constant_paths"}
    assert read_onnx_info(reference).extra.get("precision", "fp32") == "fp32"
    assert reference.stat().st_size > 1.7 * tiny_fp16_onnx.stat().st_size


def test_islands_are_fp32_in_the_converted_graph(tiny_fp16_onnx):
    model = onnx.load(str(tiny_fp16_onnx))
    types = _output_types(model)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert softmax and norms
    assert all(types[n.output[0]] == FLOAT for n in softmax + norms)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == FLOAT16 for n in convs)
    # the attention score MatMuls (Q.K^T) feed the fp32 softmax in fp32
    scores = [model.graph.node[i] for i in attention_score_nodes(list(model.graph.node)) if
              model.graph.node[i].op_type == "MatMul"]
    assert len(scores) == len(softmax) and all(types[n.output[0]] == FLOAT for n in scores)


def test_attention_islands_stop_at_the_score_matmul():
    """Softmax and its chain back to Q.K^T stay fp32; not the projections, not P.V, not the conv."""
    nodes = [helper.make_node(op, ins, outs, name=name) for name, op, ins, outs in [
        ("conv", "Conv", ["x", "w"], ["c"]), ("norm", "InstanceNormalization", ["c", "s", "b"], ["n"]),
        ("q", "MatMul", ["n", "wq"], ["q"]), ("k", "MatMul", ["n", "wk"], ["k"]),
        ("kT", "Transpose", ["k"], ["kt"]), ("scores", "MatMul", ["q", "kt"], ["sc"]),
        ("scale", "Mul", ["sc", "const"], ["ss"]), ("reshape", "Reshape", ["ss", "shape"], ["r"]),
        ("softmax", "Softmax", ["r"], ["p"]), ("v", "MatMul", ["n", "wv"], ["v"]),
        ("pv", "MatMul", ["p", "v"], ["o"]), ("gelu", "Erf", ["o"], ["g"])]]
    kept = {nodes[i].name for i in attention_score_nodes(nodes)}
    assert kept == {"scores", "scale", "reshape", "softmax"}


def test_fp16_taps_match_fp32_per_tap(tiny_fp16_onnx, photos):
    """ONNX Runtime CPU, fp16 graph vs its fp32 reference on real photos: cosine >= 0.999 per tap."""
    from cleandift_rt.features.preprocess import prepare_images

    pixels = prepare_images(list(photos.values()), (SIZE, SIZE)).pixels.numpy()
    ref = _session(fp32_reference_path(tiny_fp16_onnx)).run(list(TAPS), {IMAGE_INPUT: pixels})
    got = _session(tiny_fp16_onnx).run(list(TAPS), {IMAGE_INPUT: pixels})
    for tap, a, b in zip(TAPS, ref, got):
        assert b.dtype == np.float32 and np.isfinite(b).all()
        assert cosine(a, b).min() >= 0.999, tap


def test_engine_runs_the_fp16_graph(tiny_fp16_onnx, photos):
    fp16 = Engine(tiny_fp16_onnx, device="cpu", precision="fp32")  # ONNX Runtime, the graph as exported
    fp32 = Engine(fp32_reference_path(tiny_fp16_onnx), device="cpu", precision="fp32")
    images = list(photos.values())[:2]
    a, b = fp32.extract(images, taps=["us6"])["us6"], fp16.extract(images, taps=["us6"])["us6"]
    assert cosine(a, b).min() >= 0.999
    assert fp16.info["extra"]["precision"] == "fp16"


def _overflow_graph() -> onnx.ModelProto:
    """x -> x * 1e5 -> * 1e-5 -> y: an intermediate far beyond fp16's 65504 on ordinary inputs."""
    x = helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    up = numpy_helper.from_array(np.full((1, 4), 1e5, np.float32), "up")
    down = numpy_helper.from_array(np.full((1, 4), 1e-5, np.float32), "down")
    nodes = [helper.make_node("Mul", [IMAGE_INPUT, "up"], ["big"], name="scale_up"),
             helper.make_node("Mul", ["big", "down"], ["y"], name="scale_down")]
    graph = helper.make_graph(nodes, "overflow", [x], [y], [up, down])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_measured_ranges_one_pass_scalars_and_non_finite_anywhere(tmp_path):
    """The calibration reduces every tensor to its largest |value| inside the graph (one run); a NaN
    that is not the first element still counts (ReduceMax alone skips it), as does an Inf."""
    x = helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Div", [IMAGE_INPUT, IMAGE_INPUT], ["ratio"], name="nan_where_zero"),
             helper.make_node("Neg", [IMAGE_INPUT], ["negated"], name="negate"),
             helper.make_node("Add", ["ratio", "negated"], ["y"], name="join")]
    graph = helper.make_graph(nodes, "nan", [x], [y])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    ranges = measure_ranges(path, {IMAGE_INPUT: np.array([[1.0, 0.0, -7.0, 2.0]], np.float32)})
    assert ranges["negated"] == 7.0 and ranges[IMAGE_INPUT] == 7.0
    assert ranges["ratio"] == math.inf and ranges["y"] == math.inf  # NaN at index 1, not first
    assert not list(tmp_path.glob("*.calib-*"))  # the probe graph is removed


def test_measured_ranges_keep_overflowing_nodes_fp32(tmp_path):
    """The range rule is what saves a graph whose values leave the fp16 range: without it the
    output is inf, with it the conversion is exact. Evaluated with ONNX's reference evaluator,
    which computes in the declared types (ONNX Runtime on a CPU would quietly keep the fp32
    intermediate between two ops it runs in fp32)."""
    from onnx.reference import ReferenceEvaluator

    fp32 = tmp_path / "overflow.onnx"
    onnx.save(_overflow_graph(), str(fp32))
    feeds = {IMAGE_INPUT: np.array([[0.5, -2.0, 3.0, 1.0]], np.float32)}
    ranges = measure_ranges(fp32, feeds)
    assert ranges["big"] == pytest.approx(3e5)
    no_rules = dict(attention_scores=False, normalization=False, constant_paths=False)

    def converted(policy, ranges):
        model = onnx.load(str(fp32))
        convert_to_fp16(model, policy, ranges)
        onnx.checker.check_model(model)
        return ReferenceEvaluator(model).run(["y"], feeds)[0]

    measured = converted(PrecisionPolicy(**no_rules), ranges)
    np.testing.assert_allclose(measured, feeds[IMAGE_INPUT], rtol=1e-6)
    blind = converted(PrecisionPolicy(**no_rules), None)  # no calibration: the weights fit, the product does not
    assert not np.isfinite(blind).all()
    reasons = fp32_nodes(_overflow_graph(), PrecisionPolicy(**no_rules), ranges)
    assert set(reasons.values()) == {"max_abs"} and len(reasons) == 2


def test_conversion_refuses_what_it_cannot_do(tiny_fp16_onnx, tmp_path):
    with pytest.raises(ValueError, match="already a fp16 graph"):
        write_fp16_onnx(tiny_fp16_onnx, tmp_path / "again.onnx")
    reference = fp32_reference_path(tiny_fp16_onnx)
    with pytest.raises(ValueError, match="needs its own file"):
        write_fp16_onnx(reference, reference)
