"""Build a TensorRT plan from an exported ``.onnx`` feature graph (TensorRT 10 Python API).

Precision mechanism: a weakly typed network with ``BuilderFlag.FP16`` (TensorRT picks fp16 or
fp32 per layer by speed) plus per-layer precision constraints, obeyed, that keep fp32 islands
where SD 2.1 overflows in fp16: the attention scores (Q.K^T MatMul, its scaling and the Softmax;
SD 2.1 sets ``upcast_attention=True`` for exactly this) and the normalisation layers (GroupNorm
variances). A strongly typed network would need an fp16 ONNX with explicit casts around those
islands; the constraints give the same islands from the fp32 export.

The plan file is ``formats.plan.PLAN_MAGIC`` + a JSON header (the export metadata, the TensorRT
version, GPU architecture, profile, build summary and the baked prompt embedding, which becomes a
plain input because TensorRT treats initializers as weights) + the serialized engine.

Everything that does not need TensorRT (argument checks, profiles, fp32 layer choice, the
summary, the container) is a plain function tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from ..formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, parse_batch, read_onnx_info
from ..formats.plan import encode_array, plan_header_bytes

DEFAULT_BATCH = "1:4:8"
DEFAULT_WORKSPACE_GB = 8.0


class BuildUnavailable(RuntimeError):
    """TensorRT or a GPU is missing: the message is the one line the CLI prints."""


def check_build_environment():
    """(tensorrt module, (major, minor) GPU capability, GPU name), or ``BuildUnavailable`` saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BuildUnavailable("TensorRT is not installed (pip install tensorrt>=10 on a machine with an NVIDIA GPU); "
                               "nothing was built") from None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise BuildUnavailable("PyTorch is needed to query the GPU") from None
    if not torch.cuda.is_available():
        raise BuildUnavailable("no NVIDIA GPU is visible (torch.cuda.is_available() is False); TensorRT builds "
                               "need one; nothing was built")
    return tensorrt, tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name()


def profile_shapes(info: ArtifactInfo, batch: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of each input for one optimisation profile over batch (and size when dynamic)."""
    if batch.get("max") is None:
        raise ValueError("the TensorRT profile needs a maximum batch: pass --batch MIN:OPT:MAX")
    if info.dynamic_size:
        lo, hi = info.size_range
        opt_h, opt_w = info.default_size
        sizes = ((lo, lo), (opt_h, opt_w), (hi, hi))
    else:
        sizes = ((info.height, info.width),) * 3
    batches = (batch["min"], batch["opt"], batch["max"])
    tokens, dim = info.prompt_tokens, info.cross_attention_dim
    return {
        IMAGE_INPUT: tuple((b, 3, h, w) for b, (h, w) in zip(batches, sizes)),
        EMBEDS_INPUT: tuple((b, tokens, dim) for b in batches),
    }


def check_workspace(gb) -> float:
    gb = float(gb)
    if not 0 < gb <= 1024:
        raise ValueError(f"--workspace must be a positive number of GiB (<= 1024), got {gb}")
    return gb


# -- fp32 islands ---------------------------------------------------------------------------------


def fp32_layers(layers, softmax_type, matmul_type, passthrough_types, norm_types, is_float=lambda layer: True) -> list[int]:
    """Indices of layers to keep in fp32: every Softmax and the chain feeding it back to the first
    MatMul (attention scores and their scaling), and every normalisation layer.

    ``layers`` are TensorRT ``ILayer`` objects (or anything with ``type``, ``num_inputs``,
    ``get_input(i).name``, ``num_outputs``, ``get_output(i).name``); ``is_float`` stops the walk
    at shape computations (integer tensors feeding reshapes must keep their type).
    """
    producer = {}
    for i, layer in enumerate(layers):
        for k in range(layer.num_outputs):
            producer[layer.get_output(k).name] = i
    keep = set()
    for i, layer in enumerate(layers):
        if layer.type in norm_types:
            keep.add(i)
        if layer.type != softmax_type:
            continue
        keep.add(i)
        frontier = [i]
        while frontier:  # walk back through scaling/casts/reshapes to the score MatMul
            j = frontier.pop()
            for k in range(layers[j].num_inputs):
                tensor = layers[j].get_input(k)
                src = producer.get(tensor.name) if tensor is not None else None
                if src is None or src in keep or not is_float(layers[src]):
                    continue
                if layers[src].type == matmul_type:
                    keep.add(src)
                elif layers[src].type in passthrough_types:
                    keep.add(src)
                    frontier.append(src)
    return sorted(keep)


def precision_mix(inspector_json: str) -> dict[str, int]:
    """Count layers of the built engine by output data type, from the engine inspector's JSON."""
    data = json.loads(inspector_json)
    counts: dict[str, int] = {}
    for layer in data.get("Layers", []):
        if not isinstance(layer, dict):  # inspector without DETAILED verbosity lists names only
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        outputs = layer.get("Outputs") or [{}]
        fmt = str(outputs[0].get("Format/Datatype", "unknown"))
        kind = ("fp16" if "Half" in fmt or "FP16" in fmt else "fp32" if "Float" in fmt or "FP32" in fmt
                else "int8" if "Int8" in fmt else "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# -- ONNX preparation ------------------------------------------------------------------------------


def split_default_embeds(onnx_path: Path, work_dir: Path):
    """Write a copy of the graph whose ``prompt_embeds`` is a plain input; return (its path, the default array).

    The copy is written beside the original so that relative external-data locations still resolve.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = [t for t in model.graph.initializer if t.name == EMBEDS_INPUT]
    if not found:
        raise ValueError(f"{onnx_path} has no baked '{EMBEDS_INPUT}' default: export it with export/export_onnx.py")
    default = numpy_helper.to_array(found[0], base_dir=str(onnx_path.parent))
    model.graph.initializer.remove(found[0])
    fd, name = tempfile.mkstemp(prefix=f".{onnx_path.stem}.trt-", suffix=".onnx", dir=work_dir)
    os.close(fd)
    onnx.save_model(model, name)
    return Path(name), default


# -- the build ----------------------------------------------------------------------------------


def build_engine(onnx_path, out, *, fp16: bool = True, batch: str | None = None, timing_cache=None,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, log=print) -> dict:
    """Build ``out`` from ``onnx_path``; returns the build summary. Host-side checks run before TensorRT is needed."""
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise ValueError(f"{onnx_path} does not exist")
    if out.suffix != ".plan":
        raise ValueError(f"output {out} must end in .plan (the Engine picks the backend from the suffix)")
    info = read_onnx_info(onnx_path)
    batch_range = parse_batch(batch) if batch else (info.batch if info.batch.get("max") else parse_batch(DEFAULT_BATCH))
    shapes = profile_shapes(info, batch_range)
    workspace_gb = check_workspace(workspace_gb)
    trt, capability, gpu_name = check_build_environment()

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    stripped, default_embeds = split_default_embeds(onnx_path, onnx_path.parent)
    try:
        if not parser.parse_from_file(str(stripped)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    finally:
        stripped.unlink()

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    kept_fp32 = []
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        passthrough = {trt.LayerType.ELEMENTWISE, trt.LayerType.SCALE, trt.LayerType.SHUFFLE,
                       trt.LayerType.IDENTITY, trt.LayerType.CAST, trt.LayerType.CONSTANT}
        norms = {getattr(trt.LayerType, "NORMALIZATION")} if hasattr(trt.LayerType, "NORMALIZATION") else set()
        floats = (trt.float32, trt.float16)
        is_float = lambda layer: layer.num_outputs > 0 and layer.get_output(0).dtype in floats  # noqa: E731
        for i in fp32_layers(layers, trt.LayerType.SOFTMAX, trt.LayerType.MATRIX_MULTIPLY, passthrough, norms,
                             is_float):
            layer = layers[i]
            if layer.type == trt.LayerType.CONSTANT:
                continue
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            kept_fp32.append(layer.name)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building {out.name} for {gpu_name} (sm_{capability[0]}{capability[1]}), "
        f"{'fp16 with fp32 islands' if fp16 else 'fp32'}, batch {batch_range['min']}:{batch_range['opt']}:"
        f"{batch_range['max']}; this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_bytes = bytes(serialized)
    build_seconds = time.perf_counter() - t0
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    inspector = engine.create_engine_inspector()
    mix = precision_mix(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    summary = {"network_layers": network.num_layers, "engine_layers": engine.num_layers,
               "precision_mix": mix, "fp32_constrained_layers": len(kept_fp32),
               "engine_bytes": len(engine_bytes), "build_seconds": round(build_seconds, 1)}
    header = plan_header(info, trt.__version__, capability, gpu_name, batch_range, fp16, workspace_gb,
                         default_embeds, summary, onnx_path.name, len(engine_bytes))
    write_plan(out, header, engine_bytes)
    log(format_summary(summary))
    return summary


def plan_header(info: ArtifactInfo, trt_version: str, capability, gpu_name: str, batch: dict, fp16: bool,
                workspace_gb: float, default_embeds, summary: dict, onnx_name: str, engine_bytes: int) -> dict:
    """Everything the runtime and ``describe`` need, without TensorRT."""
    plan_info = dataclasses.replace(info, batch=dict(batch),
                                    extra=dict(info.extra, precision="fp16+fp32" if fp16 else "fp32"))
    return {
        "info": plan_info.to_dict(),
        "tensorrt": trt_version,
        "build": {"gpu_name": gpu_name, "gpu_capability": list(capability), "fp16": fp16,
                  "workspace_gb": workspace_gb, "onnx": onnx_name, **summary},
        "profile": {"batch": dict(batch), "tokens": info.prompt_tokens,
                    "size": info.size_range if info.dynamic_size else [info.height, info.width]},
        "default_prompt_embeds": encode_array(default_embeds.astype("float32")),
        "engine_bytes": engine_bytes,
    }


def write_plan(out: Path, header: dict, engine_bytes: bytes) -> None:
    """Header + engine, written to a temporary file and renamed (never a half-written plan)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(plan_header_bytes(header))
            f.write(engine_bytes)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_summary(summary: dict) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in sorted(summary["precision_mix"].items()))
    return (f"engine: {summary['engine_layers']} layers ({mix}; {summary['fp32_constrained_layers']} layers pinned "
            f"to fp32), {summary['engine_bytes'] / 2**20:.1f} MiB, built in {summary['build_seconds']:.0f} s")
