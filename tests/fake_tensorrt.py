"""A fake of the TensorRT 11 Python API surface that ``export/trt_build.py`` uses, for CPU tests.

It has what TensorRT 11.4 binds (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, timing caches,
optimisation profiles, the engine inspector) and lacks what TensorRT 11 removed
(``BuilderFlag.FP16/BF16/INT8/...``, ``OBEY/PREFER_PRECISION_CONSTRAINTS``,
``platform_has_fast_fp16``): code that still uses those fails here with the AttributeError a
user's ``pip install tensorrt`` would give. It also records how the build was driven, so the tests
can check the order of events (the plan before the timing cache).
"""

from __future__ import annotations

import json

import onnx

__version__ = "11.4.0"
events: list[str] = []


class Logger:
    WARNING = 2

    def __init__(self, level):
        self.level = level


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 1


class BuilderFlag:  # TensorRT 11: no FP16, BF16, INT8, FP8, INT4, FP4, no precision-constraint flags
    TF32 = 0
    REFIT = 1


class MemoryPoolType:
    WORKSPACE = 0


class ProfilingVerbosity:
    DETAILED = 2


class LayerInformationFormat:
    JSON = 1


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.nodes: list = []
        self.types: dict[str, int] = {}

    @property
    def num_layers(self) -> int:
        return len(self.nodes)


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, blob: bytes):
        self.foreign = blob.startswith(b"FOREIGN")  # made on another GPU / TensorRT version
        self.entries = int(blob.split(b":")[1]) if blob.startswith(b"CACHE:") else 0

    def serialize(self) -> bytes:
        events.append("cache serialized")
        return b"CACHE:%d" % self.entries


class _Config:
    def __init__(self):
        self.profiles, self.cache, self.limits = [], None, {}
        self.profiling_verbosity = None

    def set_memory_pool_limit(self, pool, size):
        self.limits[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes):
        return _TimingCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, _TimingCache):
            return False
        if cache.foreign:
            return False
        self.cache = cache
        return True

    def set_flag(self, flag):
        if flag not in (BuilderFlag.TF32, BuilderFlag.REFIT):
            raise TypeError(f"unknown builder flag {flag!r}")


class Builder:
    last_network: _Network | None = None

    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags: int = 0):
        Builder.last_network = _Network(flags)
        return Builder.last_network

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        events.append("built")
        if config.cache is not None:
            config.cache.entries += 1
        kinds = {10: "Row major linear FP16", 1: "Row major linear FP32"}
        layers = [{"Name": n.name or n.op_type,
                   "Outputs": [{"Format/Datatype": kinds.get(network.types.get(n.output[0]), "Int64")}]}
                  for n in network.nodes if n.output]
        shapes = {name: [list(s) for s in sh] for p in config.profiles for name, sh in p.shapes.items()}
        return json.dumps({"fake_engine": True, "layers": layers, "profile": shapes}).encode()


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        model = onnx.load(path, load_external_data=False)
        if "prompt_embeds" in {t.name for t in model.graph.initializer}:
            self.errors.append("prompt_embeds is an initializer: TensorRT would treat it as a weight")
            return False
        inferred = onnx.shape_inference.infer_shapes(model)
        self.network.types = {v.name: v.type.tensor_type.elem_type
                              for v in [*inferred.graph.value_info, *inferred.graph.output]}
        self.network.nodes = list(model.graph.node)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class _Inspector:
    def __init__(self, layers):
        self.layers = layers

    def get_engine_information(self, fmt) -> str:
        return json.dumps({"Layers": self.layers})


class _Engine:
    def __init__(self, doc):
        self.doc = doc

    @property
    def num_layers(self) -> int:
        return len(self.doc["layers"])

    def create_engine_inspector(self):
        return _Inspector(self.doc["layers"])


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, blob: bytes):
        return _Engine(json.loads(blob))
