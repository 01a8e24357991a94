"""export-triton: every config.pbtxt parsed with Triton's own model_config protobuf (shipped with
tritonclient) and checked against the engine file it came from. TensorRT cannot run here, so the
plan path uses plans written through formats/ with a stand-in engine body (as tests/export does)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from google.protobuf import text_format

from cleandift_rt.cli.main import main
from cleandift_rt.export.trt_build import plan_header, write_plan
from cleandift_rt.formats.artifact import external_data, read_info, read_onnx_info
from cleandift_rt.serving.repository import PARAMETER_KEY, export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient is not installed (pip install '.[dev]')")
TYPE_FP32 = model_config_pb2.DataType.Value("TYPE_FP32")
KIND = model_config_pb2.ModelInstanceGroup.Kind


def parse(folder) -> "model_config_pb2.ModelConfig":
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def check_outputs(config, info, dynamic: bool) -> None:
    """One FP32 output per tap of the file, dims [C, h, w] from its tap table (-1 where the size is dynamic)."""
    assert [o.name for o in config.output] == list(info.output_names)
    for out in config.output:
        c, h, w = info.output_shape(out.name, *info.default_size)
        assert out.data_type == TYPE_FP32
        assert list(out.dims) == ([c, -1, -1] if dynamic else [c, h, w])


def fake_plan(path, info, batch, engine=b"serialized-engine-bytes" * 7, size_range=None):
    """A plan file as export/build_engine.py writes it, around ``engine`` (not a real TensorRT engine)."""
    if size_range is not None:
        info = dataclasses.replace(info, height=None, width=None, size_range=list(size_range))
    embeds = np.random.default_rng(0).standard_normal((1, info.prompt_tokens, info.cross_attention_dim))
    header = plan_header(info, "10.12.0", (8, 9), "NVIDIA L4", batch, True, 4.0, embeds.astype(np.float32),
                         {"engine_layers": 5, "precision_mix": {"fp16": 5}}, "tiny.onnx", len(engine))
    write_plan(path, header, engine)
    return embeds.astype(np.float32), engine


def test_onnx_on_gpu_instances(tiny_onnx, tmp_path):
    source = tiny_onnx["full"]
    info = read_onnx_info(source)
    folder = export_triton(source, tmp_path / "repo", instances=2)
    config = parse(folder)
    assert (config.name, config.platform, config.backend) == ("cleandift", "onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename == "model.onnx"
    assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert config.max_batch_size == info.batch["max"] == 4  # the export's --batch 1:2:4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, KIND.Value("KIND_GPU"))]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("images", TYPE_FP32, [3, 128, 128])]
    check_outputs(config, info, dynamic=False)
    assert [(w.name, w.batch_size) for w in config.model_warmup] == [("batch_1", 1), ("batch_4", 4)]
    for warmup in config.model_warmup:
        assert list(warmup.inputs) == ["images"] and warmup.inputs["images"].zero_data
        assert list(warmup.inputs["images"].dims) == [3, 128, 128]
    assert not config.optimization.cuda.graphs  # CUDA graphs are TensorRT's
    facts = json.loads(config.parameters[PARAMETER_KEY].string_value)
    assert facts["taps"] == list(info.tap_names) and facts["size"] == [128, 128] and facts["resize"] == info.resize
    assert facts["input"]["range"] == [-1.0, 1.0] and facts["prompt_embeds"] is None
    readme = (folder / "README.md").read_text()
    assert "tritonserver --model-repository=/models" in readme and "--gpus all" in readme
    assert 'client.infer("cleandift"' in readme and "127.0.0.1:8000:8000" in readme


def test_onnx_on_cpu_is_openvino_with_its_external_data(tiny_onnx, tmp_path):
    source = tiny_onnx["subset"]  # dynamic size 64-192, weights in an external file
    info = read_onnx_info(source)
    locations = external_data(source)
    assert locations, "the subset export keeps its weights outside the graph"
    folder = export_triton(source, tmp_path / "repo", name="sub", instance_kind="cpu", max_batch=3)
    config = parse(folder)
    assert (config.platform, config.backend, config.default_model_filename) == ("", "openvino", "model.onnx")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, KIND.Value("KIND_CPU"))]
    for location in locations:  # beside model.onnx under the name the graph refers to
        assert (folder / "1" / location).read_bytes() == (source.parent / location).read_bytes()
    assert list(config.input[0].dims) == [3, -1, -1] and config.max_batch_size == 3
    assert list(config.dynamic_batching.preferred_batch_size) == [3]
    check_outputs(config, info, dynamic=True)
    h, w = info.default_size
    assert all(list(wu.inputs["images"].dims) == [3, h, w] for wu in config.model_warmup)
    assert "--gpus" not in (folder / "README.md").read_text()
    onnxruntime_cpu = parse(export_triton(source, tmp_path / "repo", name="ort", instance_kind="cpu",
                                          backend="onnxruntime"))
    assert onnxruntime_cpu.platform == "onnxruntime_onnx" and onnxruntime_cpu.instance_group[0].kind == KIND.Value(
        "KIND_CPU")


def test_plan(tiny_onnx, tmp_path):
    info = read_onnx_info(tiny_onnx["full"])
    plan = tmp_path / "tiny.plan"
    embeds, engine = fake_plan(plan, info, {"min": 1, "opt": 4, "max": 8})
    folder = export_triton(plan, tmp_path / "repo")
    config = parse(folder)
    assert (config.platform, config.backend, config.default_model_filename) == ("tensorrt_plan", "tensorrt",
                                                                                "model.plan")
    assert (folder / "1" / "model.plan").read_bytes() == engine  # the raw engine: the cleandift-rt header stripped
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].kind == KIND.Value("KIND_GPU")
    tokens, width = info.prompt_tokens, info.cross_attention_dim
    assert [(i.name, list(i.dims)) for i in config.input] == [("images", [3, 128, 128]),
                                                             ("prompt_embeds", [tokens, width])]
    check_outputs(config, read_info(plan), dynamic=False)
    assert config.optimization.cuda.graphs and not config.optimization.cuda.graph_spec
    assert [w.batch_size for w in config.model_warmup] == [1, 8]
    for warmup in config.model_warmup:  # the warm-up sends the baked prompt's embedding, as the Engine does
        assert warmup.inputs["prompt_embeds"].input_data_file == "prompt_embeds"
    raw = np.fromfile(folder / "warmup" / "prompt_embeds", "<f4").reshape(tokens, width)
    np.testing.assert_array_equal(raw, embeds[0])
    facts = json.loads(config.parameters[PARAMETER_KEY].string_value)
    assert facts["tensorrt"] == "10.12.0" and facts["prompt_embeds"] == [tokens, width]
    readme = (folder / "README.md").read_text()
    assert "must carry TensorRT 10.12.0" in readme and "NVIDIA L4 (compute 8.9)" in readme
    assert "warmup/prompt_embeds" in readme

    assert parse(export_triton(plan, tmp_path / "repo", max_batch=4)).max_batch_size == 4  # replaces its own export
    with pytest.raises(ValueError, match="above the plan's profile maximum 8"):
        export_triton(plan, tmp_path / "repo", max_batch=16)
    with pytest.raises(ValueError, match="runs on the GPU with the tensorrt backend only"):
        export_triton(plan, tmp_path / "repo", instance_kind="cpu")


def test_dynamic_size_plan_gets_graphs_at_the_default_size(tiny_onnx, tmp_path):
    info = read_onnx_info(tiny_onnx["full"])
    plan = tmp_path / "dyn.plan"
    fake_plan(plan, info, {"min": 1, "opt": 2, "max": 4}, size_range=(64, 192))
    config = parse(export_triton(plan, tmp_path / "repo"))
    assert list(config.input[0].dims) == [3, -1, -1]
    specs = config.optimization.cuda.graph_spec
    assert [s.batch_size for s in specs] == [2, 4]
    for spec in specs:
        assert list(spec.input["images"].dim) == [3, 128, 128]
        assert list(spec.input["prompt_embeds"].dim) == [info.prompt_tokens, info.cross_attention_dim]


def test_refusals(tiny_onnx, tmp_path):
    info = read_onnx_info(tiny_onnx["full"])
    plan = tmp_path / "min2.plan"
    fake_plan(plan, info, {"min": 2, "opt": 4, "max": 8})
    with pytest.raises(ValueError, match="profile starts at batch 2.*--batch 1:OPT:MAX"):
        export_triton(plan, tmp_path / "repo")
    foreign = tmp_path / "repo" / "cleandift"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("someone else's model")
    with pytest.raises(ValueError, match="was not written by export-triton"):
        export_triton(tiny_onnx["full"], tmp_path / "repo")
    assert (foreign / "keep.txt").exists()
    with pytest.raises(ValueError, match="takes an exported .plan or .onnx"):
        export_triton(_touch(tmp_path / "x.pt"), tmp_path / "repo2")
    with pytest.raises(ValueError, match="--backend openvino runs on the CPU"):
        export_triton(tiny_onnx["full"], tmp_path / "repo3", backend="openvino")
    assert not (tmp_path / "repo3").exists() or not any((tmp_path / "repo3").iterdir())


def _touch(path):
    path.write_bytes(b"x")
    return path


def test_cli(tiny_onnx, tmp_path, capsys):
    assert main(["export-triton", "--engine", str(tiny_onnx["full"]), "--out", str(tmp_path / "repo"),
                 "--max-batch", "2", "--queue-delay-us", "500", "--instances", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = parse(tmp_path / "repo" / "cleandift")
    assert config.max_batch_size == 2 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 3
    assert main(["export-triton", "--engine", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
