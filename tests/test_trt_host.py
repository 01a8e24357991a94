"""Host-side logic of the TensorRT path, tested without TensorRT or a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from cleandift_rt.formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, describe, read_onnx_info
from cleandift_rt.formats.plan import decode_array, encode_array, plan_header_bytes, read_plan_header
from cleandift_rt.runtime.backends.tensorrt import check_plan_runtime
from cleandift_rt.export.trt_build import (
    BuildUnavailable,
    build_engine,
    check_workspace,
    fp32_layers,
    plan_header,
    precision_mix,
    profile_shapes,
    split_default_embeds,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[1]


def _info(**overrides) -> ArtifactInfo:
    base = dict(taps=[{"name": "us6", "module": "up_blocks.1.upsamplers.0", "channels": 1280, "stride": 16}],
                height=768, width=768, size_range=None, default_size=[768, 768], resize="stretch",
                batch={"min": 1, "opt": 1, "max": None}, base_model="sd21", variant="sd21", student="s.safetensors",
                prompt="", timestep=261.0, cross_attention_dim=1024, prompt_tokens=77,
                block_out_channels=[320, 640, 1280, 1280], scaling_factor=0.18215)
    base.update(overrides)
    return ArtifactInfo(**base)


def test_profile_shapes_fixed_and_dynamic():
    shapes = profile_shapes(_info(), {"min": 1, "opt": 4, "max": 8})
    assert shapes[IMAGE_INPUT] == ((1, 3, 768, 768), (4, 3, 768, 768), (8, 3, 768, 768))
    assert shapes[EMBEDS_INPUT] == ((1, 77, 1024), (4, 77, 1024), (8, 77, 1024))
    dyn = _info(height=None, width=None, size_range=[512, 1024], default_size=[768, 768])
    shapes = profile_shapes(dyn, {"min": 2, "opt": 2, "max": 4})
    assert shapes[IMAGE_INPUT] == ((2, 3, 512, 512), (2, 3, 768, 768), (4, 3, 1024, 1024))
    with pytest.raises(ValueError, match="maximum batch"):
        profile_shapes(_info(), {"min": 1, "opt": 1, "max": None})


def test_workspace_checks():
    assert check_workspace("4") == 4.0
    for bad in (0, -1, 5000):
        with pytest.raises(ValueError, match="--workspace"):
            check_workspace(bad)


@dataclass
class FakeTensor:
    name: str


@dataclass
class FakeLayer:
    name: str
    type: str
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, i):
        return FakeTensor(self.inputs[i])

    def get_output(self, i):
        return FakeTensor(self.outputs[i])


def test_fp32_islands_cover_attention_scores_and_norms():
    layers = [
        FakeLayer("conv", "CONV", ["x"], ["c"]),
        FakeLayer("norm", "NORM", ["c"], ["n"]),
        FakeLayer("q", "MATMUL", ["n"], ["q"]),
        FakeLayer("k", "MATMUL", ["n"], ["k"]),
        FakeLayer("kT", "SHUFFLE", ["k"], ["kt"]),
        FakeLayer("scores", "MATMUL", ["q", "kt"], ["s"]),
        FakeLayer("scale", "ELEMENTWISE", ["s", "const"], ["ss"]),
        FakeLayer("const", "CONSTANT", [], ["const"]),
        FakeLayer("softmax", "SOFTMAX", ["ss"], ["p"]),
        FakeLayer("v", "MATMUL", ["n"], ["v"]),
        FakeLayer("pv", "MATMUL", ["p", "v"], ["o"]),
        FakeLayer("gelu", "ACTIVATION", ["o"], ["g"]),
    ]
    kept = {layers[i].name for i in fp32_layers(layers, "SOFTMAX", "MATMUL", {"ELEMENTWISE", "SHUFFLE", "CONSTANT"},
                                                {"NORM"})}
    assert kept == {"norm", "scores", "scale", "const", "softmax"}  # not the projections, not P.V, not the conv
    # a reshape between scores and softmax is followed; the integer shape math feeding it is not
    layers = [
        FakeLayer("scores", "MATMUL", ["q", "k"], ["s"]),
        FakeLayer("shape_math", "ELEMENTWISE", ["dims", "heads"], ["shape"]),
        FakeLayer("reshape", "SHUFFLE", ["s", "shape"], ["r"]),
        FakeLayer("softmax", "SOFTMAX", ["r"], ["p"]),
    ]
    kept = {layers[i].name for i in fp32_layers(layers, "SOFTMAX", "MATMUL", {"ELEMENTWISE", "SHUFFLE"}, set(),
                                                is_float=lambda layer: layer.name != "shape_math")}
    assert kept == {"scores", "reshape", "softmax"}


def test_precision_mix_from_inspector_json():
    doc = json.dumps({"Layers": [
        {"Name": "a", "Outputs": [{"Format/Datatype": "Half format"}]},
        {"Name": "b", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "c", "Outputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        "layer-d"]})
    assert precision_mix(doc) == {"fp16": 2, "fp32": 1, "unknown": 1}


def test_array_codec_round_trip():
    a = np.random.default_rng(0).standard_normal((1, 77, 8)).astype(np.float32)
    np.testing.assert_array_equal(decode_array(json.loads(json.dumps(encode_array(a)))), a)


def _header(info: ArtifactInfo, engine_bytes: int) -> dict:
    return plan_header(info, "10.3.0", (8, 6), "NVIDIA A10", {"min": 1, "opt": 4, "max": 8}, True, 8.0,
                       np.ones((1, 77, 1024), np.float32), {"engine_layers": 3, "precision_mix": {"fp16": 3}},
                       "sd21.onnx", engine_bytes)


def test_plan_container_round_trip_and_truncation(tmp_path):
    engine = bytes(range(256)) * 10
    plan = tmp_path / "sd21.plan"
    write_plan(plan, _header(_info(), len(engine)), engine)
    header, offset, nbytes = read_plan_header(plan)
    assert plan.read_bytes()[offset:] == engine and nbytes == len(engine)
    assert header["profile"] == {"batch": {"min": 1, "opt": 4, "max": 8}, "tokens": 77, "size": [768, 768]}
    assert decode_array(header["default_prompt_embeds"]).shape == (1, 77, 1024)
    d = describe(plan)
    assert d["kind"] == "tensorrt" and d["tensorrt"] == "10.3.0" and d["batch"]["max"] == 8
    assert d["build"]["gpu_capability"] == [8, 6] and d["extra"]["precision"] == "fp16+fp32"
    assert [t["name"] for t in d["taps"]] == ["us6"]
    from cleandift_rt.runtime.cli import format_info

    assert "built for: NVIDIA A10 (compute 8.6); fp16; 3 layers; precision fp16 3" in format_info(d)
    assert not [p for p in tmp_path.iterdir() if p.name != "sd21.plan"]  # no temporary left behind

    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_plan_header(plan)
    plan.write_bytes(plan.read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated"):
        read_plan_header(plan)
    for broken, named in [([1, 2], "a JSON list"), ({**_header(_info(), 3), "profile": {"batch": {}}}, "profile.tokens"),
                          ({k: v for k, v in _header(_info(), 3).items() if k != "info"}, "info")]:
        plan.write_bytes(plan_header_bytes(broken) + b"abc")
        with pytest.raises(ValueError, match=f"corrupt header.*{named}"):
            describe(plan)
    plan.write_bytes(b"\x7fELF not a plan at all")
    with pytest.raises(ValueError, match="not a cleandift-rt TensorRT plan"):
        describe(plan)


def test_plan_runtime_checks_name_the_mismatch():
    header = _header(_info(), 1)
    check_plan_runtime(header, "10.3.0", (8, 6), "p.plan")  # matching: no error
    with pytest.raises(ValueError, match="built with TensorRT 10.3.0, this machine has TensorRT 10.7.0"):
        check_plan_runtime(header, "10.7.0", (8, 6), "p.plan")
    with pytest.raises(ValueError, match=r"built for sm_86 \(NVIDIA A10\), this GPU is sm_90"):
        check_plan_runtime(header, "10.3.0", (9, 0), "p.plan")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        check_plan_runtime(header, "10.3.0", None, "p.plan")


def test_plan_of_another_major_version_is_refused(tmp_path):
    info = _info()
    info.package_version = "7.1.0"
    plan = tmp_path / "old.plan"
    write_plan(plan, _header(info, 4), b"abcd")
    with pytest.raises(ValueError, match=r"cleandift-rt 7\.1\.0"):
        describe(plan)


def test_default_embeds_become_a_plain_input(tiny_onnx, tiny_base, tmp_path):
    for key in ("full", "subset"):  # inline weights and external data
        stripped, default = split_default_embeds(tiny_onnx[key], tiny_onnx[key].parent)
        try:
            model = onnx.load(str(stripped), load_external_data=False)
            assert EMBEDS_INPUT in [i.name for i in model.graph.input]
            assert EMBEDS_INPUT not in [t.name for t in model.graph.initializer]
            onnx.checker.check_model(str(stripped))
        finally:
            stripped.unlink()
        np.testing.assert_allclose(default, tiny_base.encode_prompt("").numpy(), atol=1e-6)


def test_build_checks_arguments_before_needing_tensorrt(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="must end in .plan"):
        build_engine(tiny_onnx["full"], tmp_path / "x.engine")
    with pytest.raises(ValueError, match="MIN:OPT:MAX"):
        build_engine(tiny_onnx["full"], tmp_path / "x.plan", batch="4:1")
    with pytest.raises(ValueError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.plan")
    assert read_onnx_info(tiny_onnx["full"]).batch["max"] == 4  # the export's range is the default profile
    with pytest.raises(BuildUnavailable, match="TensorRT is not installed|no NVIDIA GPU"):
        build_engine(tiny_onnx["full"], tmp_path / "x.plan", batch="1:2:4")
    assert not (tmp_path / "x.plan").exists()


def test_cli_without_tensorrt_prints_one_line(tiny_onnx, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), "--onnx", str(tiny_onnx["full"]),
                           "--out", str(tmp_path / "x.plan"), "--fp16"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("build_engine: ") and ("TensorRT" in proc.stderr or "GPU" in proc.stderr)
    bad = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), "--onnx", str(tiny_onnx["full"]),
                          "--out", str(tmp_path / "x.plan"), "--workspace", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--workspace" in bad.stderr and "Traceback" not in bad.stderr
