"""Host-side logic of the TensorRT path, tested without TensorRT or a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fake_tensorrt
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
    plan_header,
    precision_mix,
    profile_shapes,
    split_default_embeds,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[2]


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
    from cleandift_rt.cli.info import format_info

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


# -- the build against a fake of TensorRT's API (tests/fake_tensorrt.py), 11.4 unless a test asks for 10.12 --


@pytest.fixture()
def fake_trt(monkeypatch, request):
    from cleandift_rt.export import trt_build

    fake = fake_tensorrt.load(getattr(request, "param", "11.4.0.106"))
    monkeypatch.setattr(trt_build, "check_build_environment", lambda: (fake, (9, 0), "Fake H200"))
    return fake


@pytest.mark.parametrize("fake_trt", ["11.4.0.106", "10.12.0.36"], indirect=True)
def test_strongly_typed_build_of_the_fp16_graph(fake_trt, tiny_fp16_onnx, tmp_path):
    plan, cache = tmp_path / "tiny.plan", tmp_path / "tiny.cache"
    summary = build_engine(tiny_fp16_onnx, plan, batch="1:2:4", timing_cache=cache, verify=False, log=lambda *_: None)
    assert fake_trt.Builder.last_network.flags & (1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    header, _, _ = read_plan_header(plan)
    assert header["build"]["fp16"] is True and header["info"]["extra"]["precision"] == "fp16+fp32"
    assert "precision_policy" not in header["info"]["extra"] and header["tensorrt"] == fake_trt.__version__
    assert summary["precision_mix"]["fp16"] > 0 and summary["precision_mix"]["fp32"] > 0  # islands reach the engine
    assert fake_trt.events == ["built", "cache serialized"] and cache.read_bytes() == b"CACHE:1"
    build_engine(tiny_fp16_onnx, plan, batch="1:2:4", timing_cache=cache, verify=False, log=lambda *_: None)
    assert cache.read_bytes() == b"CACHE:2"  # read back and extended, not replaced


def test_only_tensorrt_10_needs_the_strongly_typed_flag(tiny_fp16_onnx, tmp_path):
    """What makes the 10.12 case above meaningful: without the flag, 10.12 drops the graph's types."""

    def mix(version, flags, builder_flags=()):
        trt = fake_tensorrt.load(version)
        builder = trt.Builder(trt.Logger())
        network = builder.create_network(flags)
        stripped, _ = split_default_embeds(tiny_fp16_onnx, tmp_path)
        assert trt.OnnxParser(network, trt.Logger()).parse_from_file(str(stripped))
        config = builder.create_builder_config()
        for name in builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(builder.build_serialized_network(network, config))
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        return set(precision_mix(info)) - {"other"}  # integer shape arithmetic

    typed = 1 << fake_tensorrt.load("10.12.0.36").NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert mix("10.12.0.36", typed) >= {"fp16", "fp32"}  # the islands reach the engine
    assert mix("10.12.0.36", 0) == {"fp32"}  # weakly typed: the fp16 graph runs in fp32
    assert mix("10.12.0.36", 0, ["FP16"]) == {"fp16"}  # weakly typed with FP16: the islands are lost
    assert mix("11.4.0.106", 0) >= {"fp16", "fp32"}  # 11.x: always strongly typed
    with pytest.raises(AttributeError):
        fake_tensorrt.load("11.4.0.106").BuilderFlag.FP16


def test_fp16_flag_on_an_fp32_graph_converts_first_and_says_so(fake_trt, tiny_onnx, tmp_path):
    said = []
    build_engine(tiny_onnx["full"], tmp_path / "x.plan", fp16=True, verify=False, log=said.append)
    converted = tiny_onnx["full"].with_name(tiny_onnx["full"].stem + ".fp16.onnx")
    assert converted.is_file() and read_onnx_info(converted).extra["precision"] == "fp16"
    assert any("converting it to fp16" in line and "--precision fp16" in line for line in said)
    assert read_plan_header(tmp_path / "x.plan")[0]["build"]["fp16"] is True
    build_engine(tiny_onnx["full"], tmp_path / "y.plan", fp16=False, verify=False, log=lambda *_: None)
    assert read_plan_header(tmp_path / "y.plan")[0]["info"]["extra"]["precision"] == "fp32"


def test_a_timing_cache_problem_never_costs_the_plan(fake_trt, tiny_fp16_onnx, tmp_path):
    said = []
    foreign = tmp_path / "foreign.cache"
    foreign.write_bytes(b"FOREIGN-GPU")
    build_engine(tiny_fp16_onnx, tmp_path / "a.plan", timing_cache=foreign, verify=False, log=said.append)
    assert any("another GPU" in line for line in said) and foreign.read_bytes() == b"CACHE:1"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    said.clear()
    build_engine(tiny_fp16_onnx, tmp_path / "b.plan", timing_cache=blocker / "x.cache", verify=False, log=said.append)
    assert (tmp_path / "b.plan").is_file()  # written before the cache, whatever happens to the cache
    assert any("timing cache could not be written" in line for line in said)


def test_verification_records_cosines_and_refuses_a_bad_plan(fake_trt, tiny_fp16_onnx, tmp_path, monkeypatch):
    from cleandift_rt.export import verify

    reference = tiny_fp16_onnx.with_name(tiny_fp16_onnx.stem + ".fp32.onnx")
    seen = []

    def fake_verify(plan, ref, min_cosine, log):
        seen.append((Path(plan).name, Path(ref)))
        return {"us6": 0.9991, "us10": 0.9987}, True

    monkeypatch.setattr(verify, "verify_plan", fake_verify)
    build_engine(tiny_fp16_onnx, tmp_path / "ok.plan", log=lambda *_: None)
    header = read_plan_header(tmp_path / "ok.plan")[0]
    assert header["verified_cosine"] == {"us6": 0.9991, "us10": 0.9987} and header["verified_against"] == reference.name
    assert seen == [("ok.unverified.plan", reference)] and not (tmp_path / "ok.unverified.plan").exists()

    monkeypatch.setattr(verify, "verify_plan", lambda plan, ref, m, log: ({"us6": float("nan")}, False))
    with pytest.raises(verify.VerificationFailed, match="kept there for inspection"):
        build_engine(tiny_fp16_onnx, tmp_path / "bad.plan", log=lambda *_: None)
    assert not (tmp_path / "bad.plan").exists() and (tmp_path / "bad.unverified.plan").is_file()


def test_reference_is_resolved_before_any_build(tiny_fp16_onnx, tiny_onnx, tmp_path):
    from cleandift_rt.export.verify import passes, reference_for, tap_cosines

    info = read_onnx_info(tiny_fp16_onnx)
    assert reference_for(tiny_fp16_onnx, info).name == tiny_fp16_onnx.stem + ".fp32.onnx"
    assert reference_for(tiny_onnx["full"], read_onnx_info(tiny_onnx["full"])) == tiny_onnx["full"]
    with pytest.raises(ValueError, match="is a fp16 graph"):
        reference_for(tiny_fp16_onnx, info, tiny_fp16_onnx)
    with pytest.raises(ValueError, match="lacks taps"):
        reference_for(tiny_fp16_onnx, info, tiny_onnx["subset"])
    with pytest.raises(ValueError, match="does not exist"):
        reference_for(tiny_fp16_onnx, info, tmp_path / "nope.onnx")
    a = {"us6": np.ones((2, 3, 4, 4), np.float32)}
    assert tap_cosines(a, {"us6": a["us6"] * 2}) == {"us6": 1.0}
    broken = {"us6": np.full((2, 3, 4, 4), np.nan, np.float32)}
    assert not passes(tap_cosines(a, broken), 0.5) and passes({"us6": 0.999}, 0.995)


# TensorRT 11 removed these; none may appear in the build or runtime code (our own `precision`
# arguments are not TensorRT's and are not matched).
REMOVED_TENSORRT_API = ["BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8",
                        "BuilderFlag.INT4", "BuilderFlag.FP4", "OBEY_PRECISION_CONSTRAINTS",
                        "PREFER_PRECISION_CONSTRAINTS", "platform_has_fast_fp16", "platform_has_fast_int8",
                        "layer.precision =", ".set_output_type(", "trt_fp16_enable"]


def _code_only(path: Path) -> str:
    """The file's code without comments and strings (docstrings may name the removed API)."""
    import io
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))


def removed_api_uses(path: Path) -> list[str]:
    code = _code_only(path).replace(" ", "")
    return [name for name in REMOVED_TENSORRT_API if name.replace(" ", "") in code]


def test_the_removed_api_scan_sees_code_not_prose(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Never BuilderFlag.FP16 here."""\n# nor OBEY_PRECISION_CONSTRAINTS\n'
                      "config.set_flag(trt.BuilderFlag.FP16)\nlayer.precision = trt.float32\n")
    assert removed_api_uses(sample) == ["BuilderFlag.FP16", "layer.precision ="]


def test_no_api_that_tensorrt_11_removed():
    package = ROOT / "python" / "cleandift_rt"
    files = [package / "export" / "trt_build.py", package / "export" / "verify.py",
             package / "runtime" / "backends" / "tensorrt.py", package / "runtime" / "backends" / "onnxruntime.py",
             ROOT / "export" / "build_engine.py", ROOT / "bench" / "gpu_check.py", ROOT / "bench" / "_gpu_latency.py"]
    found = {f.name: removed_api_uses(f) for f in files if f.exists() and removed_api_uses(f)}
    assert not found


def test_binding_checks_every_tap_shape_against_the_metadata():
    import torch
    from cleandift_rt.runtime.backends.tensorrt import TensorRTBackend

    backend = object.__new__(TensorRTBackend)  # the host-side checks only; no GPU, no TensorRT
    backend.info, backend.path = _info(), Path("sd21.plan")
    views = {IMAGE_INPUT: torch.zeros(2, 3, 768, 768), EMBEDS_INPUT: torch.zeros(2, 77, 1024),
             "us6": torch.zeros(2, 1280, 48, 48)}
    good = fake_tensorrt.IExecutionContext({"us6": (2, 1280, 48, 48)})
    backend._bind(good, views)
    assert good.inputs[IMAGE_INPUT] == (2, 3, 768, 768) and set(good.addresses) == set(views)
    with pytest.raises(RuntimeError, match=r"computes tap 'us6' as \(2, 1280, 24, 24\).*rebuild"):
        backend._bind(fake_tensorrt.IExecutionContext({"us6": (2, 1280, 24, 24)}), views)
    with pytest.raises(ValueError, match="rejected input shape"):
        backend._bind(fake_tensorrt.IExecutionContext({"us6": (2, 1280, 48, 48)}, accept=False), views)
    with pytest.raises(RuntimeError, match="refused the buffer of 'extra'"):  # set_tensor_address's False
        backend._bind(fake_tensorrt.IExecutionContext({"us6": (2, 1280, 48, 48)}), {**views, "extra": views["us6"]})


def test_onnxruntime_tensorrt_provider_gets_the_profile_and_no_fp16_flag():
    from cleandift_rt.runtime.backends.onnxruntime import choose_providers, trt_profile

    fixed = trt_profile(_info(batch={"min": 1, "opt": 4, "max": 8}))
    assert fixed == {"trt_profile_min_shapes": "images:1x3x768x768,prompt_embeds:1x77x1024",
                     "trt_profile_opt_shapes": "images:4x3x768x768,prompt_embeds:4x77x1024",
                     "trt_profile_max_shapes": "images:8x3x768x768,prompt_embeds:8x77x1024"}
    dynamic = trt_profile(_info(height=None, width=None, size_range=[512, 1024], default_size=[768, 768]))
    assert dynamic["trt_profile_min_shapes"].startswith("images:1x3x512x512")
    assert dynamic["trt_profile_opt_shapes"].startswith("images:1x3x768x768")
    assert dynamic["trt_profile_max_shapes"].startswith("images:8x3x1024x1024")  # unbounded export: a default max
    providers = choose_providers(None, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                 Path("m.onnx"), 0, fixed)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider" and options["trt_profile_max_shapes"] == fixed["trt_profile_max_shapes"]
    assert not any("fp16" in key for key in options)
    assert choose_providers("cpu", ["TensorrtExecutionProvider"], Path("m.onnx")) == ["CPUExecutionProvider"]


def test_a_plan_with_the_aggregators_output_binds_it_too():
    import torch
    from cleandift_rt.runtime.backends.tensorrt import TensorRTBackend

    info = _info(extra={"hyper": {"channels": 384, "stride": 8, "source": "cleandift"}})
    assert info.output_names == ("us6", "hyper") and info.output_shape("hyper", 768, 512) == (384, 96, 64)
    backend = object.__new__(TensorRTBackend)
    backend.info, backend.path = info, Path("sd21.plan")
    views = {IMAGE_INPUT: torch.zeros(1, 3, 768, 768), EMBEDS_INPUT: torch.zeros(1, 77, 1024),
             "us6": torch.zeros(1, 1280, 48, 48), "hyper": torch.zeros(1, 384, 96, 96)}
    backend._bind(fake_tensorrt.IExecutionContext({"us6": (1, 1280, 48, 48), "hyper": (1, 384, 96, 96)}), views)
    with pytest.raises(RuntimeError, match="computes tap 'hyper'"):
        backend._bind(fake_tensorrt.IExecutionContext({"us6": (1, 1280, 48, 48), "hyper": (1, 384, 48, 48)}), views)
    with pytest.raises(ValueError, match="extra.hyper.stride"):
        ArtifactInfo.from_dict({**info.to_dict(), "extra": {"hyper": {"channels": 384, "stride": 7}}}, "x")


def test_cuda_graphs_capture_once_per_shape_and_keep_the_latest(monkeypatch):
    """TensorRTBackend._execute's graph bookkeeping, with CUDA graphs faked (no GPU here)."""
    import contextlib
    import types
    from collections import OrderedDict

    import torch
    from cleandift_rt.runtime.backends.tensorrt import MAX_GRAPHS, TensorRTBackend

    class Graph:
        def __init__(self):
            self.replays = 0

        def replay(self):
            self.replays += 1

    captures = []

    @contextlib.contextmanager
    def capture(graph, stream=None, capture_error_mode=None):
        captures.append((graph, stream, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    backend = object.__new__(TensorRTBackend)
    backend.info, backend.path, backend.cuda_graph, backend._graphs = _info(), Path("sd21.plan"), True, OrderedDict()
    backend.stream = types.SimpleNamespace(cuda_stream=7)
    backend.engine = fake_tensorrt.ICudaEngine({"layers": [], "tap_shapes": {"us6": (1, 1280, 48, 48)}})
    views = {IMAGE_INPUT: torch.zeros(1, 3, 768, 768), EMBEDS_INPUT: torch.zeros(1, 77, 1024),
             "us6": torch.zeros(1, 1280, 48, 48)}

    backend._execute((1, 768, 768), views)
    context, graph = backend._graphs[(1, 768, 768)]
    assert context.launches == [7, 7]  # an ordinary launch (this call's outputs), then the captured one
    assert captures == [(graph, backend.stream, "thread_local")] and set(context.addresses) == set(views)
    backend._execute((1, 768, 768), views)
    assert graph.replays == 1 and context.launches == [7, 7]  # replayed, not enqueued again
    for batch in range(2, 2 + MAX_GRAPHS):  # the same views stand in for other shapes' keys
        backend._execute((batch, 768, 768), views)
    assert len(backend._graphs) == MAX_GRAPHS and (1, 768, 768) not in backend._graphs  # least recently used out

    backend.cuda_graph, backend.context = False, fake_tensorrt.IExecutionContext({"us6": (1, 1280, 48, 48)})
    backend._execute((1, 768, 768), views)
    assert backend.context.launches == [7] and len(captures) == 1 + MAX_GRAPHS
    backend.context.runs = False
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        backend._execute((1, 768, 768), views)
