"""The project's TensorRT code and its fake, checked against the real bindings of TensorRT 10.12 and 11.4.

The real ``tensorrt_bindings`` module of each version is imported on this CPU-only machine with stub
libraries (``trt_surface``): its classes, enum members, properties and pybind11 signatures are the
reference. Every TensorRT name the project uses is found by walking the source (``trt_usage``), so new
code is checked without editing this file. The first run downloads two 1.3 MB wheels into
~/.cache/cleandift-rt/trt-bindings (``CLEANDIFT_TRT_BINDINGS_CACHE``); later runs take ~3 s offline.
"""

from __future__ import annotations

import functools
import textwrap
import types
from pathlib import Path

import fake_tensorrt
import pytest
import trt_surface
import trt_usage

ROOT = Path(__file__).resolve().parents[2]
FULL_VERSION = {"10.12": "10.12.0.36", "11.4": "11.4.0.106"}

# Deprecated names the code uses knowingly: 11.x ignores STRONGLY_TYPED (always strongly typed), 10.12
# needs it; passing it keeps one build path for both. A new deprecated use fails until listed here.
KNOWN_DEPRECATED = {"10.12": set(), "11.4": {"NetworkDefinitionCreationFlag.STRONGLY_TYPED"}}

# The calls the build and the runtime cannot do without: the analysis must keep seeing them.
CORE_CALLS = {"Builder.create_network", "Builder.build_serialized_network", "OnnxParser.parse_from_file",
              "IBuilderConfig.set_timing_cache", "IOptimizationProfile.set_shape", "Runtime.deserialize_cuda_engine",
              "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_name",
              "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
              "IExecutionContext.execute_async_v3", "EngineInspector.get_engine_information"}


@functools.cache
def _surface(version: str):
    try:
        return trt_usage.Surface(trt_surface.surface(version))
    except trt_surface.Unavailable as exc:
        return str(exc)


@pytest.fixture(params=sorted(trt_surface.WHEELS))
def real(request) -> trt_usage.Surface:
    found = _surface(request.param)
    if isinstance(found, str):
        pytest.skip(found)
    assert found.data["version"] == FULL_VERSION[request.param]
    return found


def _short(real) -> str:
    return ".".join(real.data["version"].split(".")[:2])


def _check(real, *sources: str) -> list[str]:
    files = {f"snippet{i}.py": textwrap.dedent(text) for i, text in enumerate(sources)}
    return trt_usage.problems(trt_usage.uses(files, real), real)


def test_every_tensorrt_name_the_project_uses_exists(real):
    sources = trt_usage.project_sources(ROOT)
    assert {"python/cleandift_rt/export/trt_build.py",
            "python/cleandift_rt/runtime/backends/tensorrt.py"} <= set(sources)
    found = trt_usage.uses(sources, real)
    assert CORE_CALLS <= {u.label for u in found if u.kind == "call"}
    assert trt_usage.problems(found, real) == []
    assert trt_usage.deprecated(found, real) == KNOWN_DEPRECATED[_short(real)]


def test_the_builder_flag_fp16_of_weak_typing_fails_on_11_and_passes_on_10(real):
    # the build as it was before strong typing (weak typing with per-layer precision hints)
    old = """
        def build(onnx_path):
            import tensorrt as trt
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            config = builder.create_builder_config()
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            layers = [network.get_layer(i) for i in range(network.num_layers)]
            for layer in layers:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
            return builder.build_serialized_network(network, config)
    """
    found = _check(real, old)
    if _short(real) == "10.12":
        assert found == []
    else:
        missing = {line.split(": ")[1].split()[0] for line in found}
        assert missing == {"BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "ILayer.precision",
                           "ILayer.set_output_type"}, found


def test_each_kind_of_misuse_is_flagged(real):
    found = _check(real, """
        def load_trt():
            import tensorrt
            return tensorrt, 8
    """, """
        from .loader import load_trt  # the module handed out by another file's function

        class Backend:
            def __init__(self, blob):
                trt, _ = load_trt()
                self.engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(blob)
                self.engine.num_layers = 3
                self._run(self.engine.create_execution_context())

            def _run(self, context):
                context.execute_async_v4(0)
                context.execute_async_v3()
                context.set_input_shape(name="images", dims=(1, 3, 64, 64))
                context.set_tensor_address("images", 0)  # returns False on failure: ignored here

        def configure(builder, trt):
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.BuilderFlag.TF32, 1 << 30)
            config.set_timing_cache(config.create_timing_cache(b""), ignore=False)
            config.set_memory_pool_limit(0, 1 << 30)

        def main():
            import tensorrt as trt
            configure(trt.Builder(trt.Logger()), trt)
    """)
    said = "\n".join(found)
    assert "ICudaEngine.num_layers cannot be assigned" in said
    assert "IExecutionContext.execute_async_v4 does not exist" in said
    assert "IExecutionContext.execute_async_v3 called with 0 positional" in said
    assert "IExecutionContext.set_input_shape called with 0 positional and keywords ['name', 'dims']" in said
    assert "IBuilderConfig.set_timing_cache called with 1 positional and keywords ['ignore']" in said
    # an enum of the wrong kind, and a plain int where an enum is wanted
    assert said.count("IBuilderConfig.set_memory_pool_limit called with 2 positional") == 2
    assert "IExecutionContext.set_tensor_address returns whether it succeeded (bool) and the code ignores it" in said
    assert len(found) == 8, said


def test_the_fake_offers_only_what_the_real_module_has(real):
    fake = fake_tensorrt.load(real.data["version"])
    assert trt_usage.fake_problems(fake, real) == []
    if _short(real) == "11.4":
        assert trt_usage.fake_problems(fake_tensorrt, real) == []  # `import fake_tensorrt` is 11.4 too


def test_a_fake_that_drifted_is_caught(real):
    drifted = types.ModuleType("drifted")
    drifted.__version__, drifted.FAKE_ONLY = real.data["version"], set()

    class OnnxParser:
        def parse_from_file(self, path):  # TensorRT's argument is `model`
            return True

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 7

    class IHostMemory:
        nbytes = 0  # writable here, read-only in TensorRT

    class Network:  # no such class
        pass

    for cls in (OnnxParser, NetworkDefinitionCreationFlag, IHostMemory, Network):
        cls.__module__ = "drifted"
        setattr(drifted, cls.__name__, cls)
    found = "\n".join(trt_usage.fake_problems(drifted, real))
    assert "OnnxParser.parse_from_file: the fake's signature matches no real one ([['model']])" in found
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED = 7 in the fake" in found
    assert "IHostMemory.nbytes is a plain (writable) attribute in the fake, read-only" in found
    assert "Network: TensorRT" in found and "has no such class" in found


def test_signatures_are_read_from_pybind11_docstrings():
    doc = ("set_input_shape(*args, **kwargs)\nOverloaded function.\n\n"
           "1. set_input_shape(self: tensorrt_bindings.tensorrt.IExecutionContext, name: str, shape: tuple) -> bool\n\n"
           "2. set_input_shape(self: tensorrt_bindings.tensorrt.IExecutionContext, name: str, "
           "shape: typing.Annotated[list[int], 'Dims'], *, strict: bool = False) -> bool\n")
    first, second = trt_surface.parse_signatures(doc, "set_input_shape")
    assert [p["name"] for p in first["params"]] == ["name", "shape"] and first["returns"] == "bool"
    assert [(p["name"], p["kind"], p["default"]) for p in second["params"]] == [
        ("name", "any", False), ("shape", "any", False), ("strict", "keyword", True)]
    assert second["params"][1]["type"] == "typing.Annotated[list[int], 'Dims']"
    logger = trt_surface.parse_signatures(
        "__init__(self: tensorrt_bindings.tensorrt.Logger, min_severity: tensorrt_bindings.tensorrt.ILogger.Severity "
        "= <Severity.WARNING: 2>) -> None", "__init__")
    assert logger[0]["params"] == [{"name": "min_severity", "type": "tensorrt_bindings.tensorrt.ILogger.Severity",
                                    "default": True, "kind": "any"}]
    assert trt_usage.trt_type("tensorrt_bindings.tensorrt.ILogger.Severity") == "ILogger.Severity"
    assert trt_usage.trt_type("typing.SupportsInt") is None


def test_modules_that_get_tensorrt_from_another_module_are_checked_too(tmp_path):
    (tmp_path / "python").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "python" / "loader.py").write_text("def import_trt():\n    import tensorrt\n    return tensorrt\n")
    (tmp_path / "bench" / "user.py").write_text("from loader import import_trt\n\ntrt = import_trt()\n")
    (tmp_path / "bench" / "other.py").write_text("from loader import something_else\n")
    assert sorted(trt_usage.project_sources(tmp_path)) == ["bench/user.py", "python/loader.py"]


def test_an_unreachable_index_is_a_one_line_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_surface, "CACHE", tmp_path)
    for name, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                        "PIP_NO_INDEX": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(trt_surface.Unavailable, match=r"cannot fetch tensorrt-cu13-bindings==11\.4\.0\.106") as err:
        trt_surface.fetch_wheel("11.4")
    assert "\n" not in str(err.value)
