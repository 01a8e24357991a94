"""A fake of the TensorRT Python API that ``export/trt_build.py`` uses, for CPU tests, as 11.4 or 10.12.

``import fake_tensorrt`` is TensorRT 11.4; ``load(version)`` returns a fresh copy (its own classes,
event log and last network) claiming ``"11.4.0.106"`` or ``"10.12.0.36"``.

Real names only: every class here, each of its methods (argument names and defaults), properties
and enum members (with their values) exists in the real module of the version the fake claims;
``tests/export/test_trt_real_bindings.py`` checks that against the real bindings, so the fake
cannot drift. The exceptions are what the fake records for the tests (``FAKE_ONLY``, instance
attributes) and the constructors of classes that only TensorRT itself creates.

Where the versions differ the fake behaves as they do:
- 11.x removed weak typing: no ``BuilderFlag.FP16/BF16/INT8/FP8/INT4/FP4``, no precision-constraint
  flags; every network is strongly typed and ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (0)
  is accepted and ignored. Code that still uses the removed flags fails with the AttributeError a
  user's ``pip install tensorrt`` would give.
- 10.12 has those flags, and a network is strongly typed only when created with
  ``1 << STRONGLY_TYPED`` (1). A weakly typed network ignores the graph's types: every layer runs in
  fp32, or in fp16 with ``BuilderFlag.FP16`` (fp32 islands lost), so a build that forgets the flag
  shows in the engine's precision mix.
It also records how the build was driven (``events``), so the tests can check the order of events
(the plan before the timing cache).
"""

from __future__ import annotations

import importlib.util
import json

import onnx

__version__ = "11.4.0.106"
VERSIONS = ("11.4.0.106", "10.12.0.36")
FAKE_ONLY = {"last_network"}  # class attributes the tests read; the real classes have none of them
events: list[str] = []

# BuilderFlag members TensorRT 11 removed, with their 10.12 values
WEAK_TYPING_FLAGS = {"FP16": 0, "INT8": 1, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
                     "FP8": 15, "BF16": 17, "INT4": 22, "FP4": 26}
ONNX_FLOAT, ONNX_FLOAT16 = 1, 10  # onnx.TensorProto element types


def load(version: str = VERSIONS[0]):
    """A fresh fake module claiming ``version``."""
    if version not in VERSIONS:
        raise ValueError(f"the fake models TensorRT {' and '.join(VERSIONS)}, not {version}")
    spec = importlib.util.spec_from_file_location(f"fake_tensorrt_{version.replace('.', '_')}", __file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._claim(version)
    return module


def _claim(version: str) -> None:
    global __version__
    __version__ = version
    if version.startswith("10."):
        NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0  # deprecated and ignored in 10.x
        NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1
        for name, value in WEAK_TYPING_FLAGS.items():
            setattr(BuilderFlag, name, value)


def _always_strongly_typed() -> bool:
    return int(__version__.split(".")[0]) >= 11


class Logger:
    WARNING = 2

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 0  # 11.x; 1 on 10.x (load sets it)


class BuilderFlag:  # TensorRT 11: no FP16, BF16, INT8, FP8, INT4, FP4, no precision-constraint flags
    REFIT = 4
    TF32 = 6


class MemoryPoolType:
    WORKSPACE = 0


class ProfilingVerbosity:
    DETAILED = 2


class LayerInformationFormat:
    JSON = 1


class INetworkDefinition:
    def __init__(self, flags: int):
        self._flags = flags
        self.nodes: list = []
        self.types: dict[str, int] = {}

    @property
    def num_layers(self) -> int:
        return len(self.nodes)

    @property
    def flags(self) -> int:
        return self._flags

    def get_flag(self, flag):
        if flag == NetworkDefinitionCreationFlag.STRONGLY_TYPED and _always_strongly_typed():
            return True
        return bool(self._flags & (1 << flag))


class IOptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's argument names
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache:
    def __init__(self, blob: bytes):
        self.foreign = blob.startswith(b"FOREIGN")  # made on another GPU / TensorRT version
        self.entries = int(blob.split(b":")[1]) if blob.startswith(b"CACHE:") else 0

    def serialize(self) -> bytes:
        events.append("cache serialized")
        return b"CACHE:%d" % self.entries


class IBuilderConfig:
    profiling_verbosity = None

    def __init__(self):
        self.profiles, self.cache, self.limits, self._flags = [], None, {}, 0

    def set_memory_pool_limit(self, pool, pool_size):
        self.limits[pool] = pool_size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(cache, ITimingCache) or cache.foreign:
            return False
        self.cache = cache
        return True

    def set_flag(self, flag):
        known = {v for k, v in vars(BuilderFlag).items() if not k.startswith("_")}
        if flag not in known:
            raise TypeError(f"unknown builder flag {flag!r}")
        self._flags |= 1 << flag

    def get_flag(self, flag):
        return bool(self._flags & (1 << flag))

    @property
    def flags(self) -> int:
        return self._flags


class Builder:
    last_network: INetworkDefinition | None = None

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        Builder.last_network = INetworkDefinition(flags)
        return Builder.last_network

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_serialized_network(self, network, config):
        events.append("built")
        if config.cache is not None:
            config.cache.entries += 1
        kinds = {ONNX_FLOAT16: "Row major linear FP16", ONNX_FLOAT: "Row major linear FP32"}
        if not network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED):  # weak typing: the builder picks,
            weak_fp16 = hasattr(BuilderFlag, "FP16") and config.get_flag(BuilderFlag.FP16)  # islands not honoured
            kinds = dict.fromkeys(kinds, kinds[ONNX_FLOAT16 if weak_fp16 else ONNX_FLOAT])
        kind = {n.output[0]: kinds.get(network.types.get(n.output[0]), "Int64") for n in network.nodes if n.output}
        layers = [{"Name": n.name or n.op_type, "Outputs": [{"Format/Datatype": kind[n.output[0]]}]}
                  for n in network.nodes if n.output]
        shapes = {name: [list(s) for s in sh] for p in config.profiles for name, sh in p.shapes.items()}
        return json.dumps({"fake_engine": True, "layers": layers, "profile": shapes}).encode()


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, model):
        graph = onnx.load(model, load_external_data=False)
        if "prompt_embeds" in {t.name for t in graph.graph.initializer}:
            self.errors.append("prompt_embeds is an initializer: TensorRT would treat it as a weight")
            return False
        inferred = onnx.shape_inference.infer_shapes(graph)
        self.network.types = {v.name: v.type.tensor_type.elem_type
                              for v in [*inferred.graph.value_info, *inferred.graph.output]}
        self.network.nodes = list(graph.graph.node)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]


class EngineInspector:
    def __init__(self, layers):
        self.layers = layers

    def get_engine_information(self, format):  # noqa: A002 - TensorRT's argument name
        return json.dumps({"Layers": self.layers})


class IExecutionContext:
    """What the runtime backend asks of a context: ``shapes`` are the output shapes TensorRT would compute."""

    def __init__(self, shapes: dict, accept: bool = True):
        self.shapes, self.accept, self.addresses, self.inputs, self.launches = shapes, accept, {}, {}, []
        self.runs = True  # whether an enqueue succeeds

    def set_input_shape(self, name, shape):
        self.inputs[name] = tuple(shape)
        return self.accept

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def set_tensor_address(self, name, memory):
        self.addresses[name] = memory
        return name in self.inputs or name in self.shapes  # TensorRT refuses names it does not know

    def execute_async_v3(self, stream_handle):
        self.launches.append(stream_handle)
        return self.runs


class ICudaEngine:
    def __init__(self, doc):
        self.doc = doc  # the fake build's JSON: layers, profile; runtime tests add the tap shapes

    @property
    def num_layers(self) -> int:
        return len(self.doc["layers"])

    def create_engine_inspector(self):
        return EngineInspector(self.doc["layers"])

    def create_execution_context(self):
        return IExecutionContext(self.doc.get("tap_shapes", {}))


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        return ICudaEngine(json.loads(serialized_engine))
