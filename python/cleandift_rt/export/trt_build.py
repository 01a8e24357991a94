"""Build a TensorRT plan from an exported ``.onnx`` feature graph: strongly typed, TensorRT 10.12 to 11.x.

TensorRT 11 removed weak typing (``BuilderFlag.FP16``, precision constraints, per-layer precision
hints): every tensor's type comes from the ONNX graph, so precision is decided at export. An fp16
plan is built from the fp16 graph with fp32 islands that ``export_onnx.py --precision fp16`` writes
(``export.mixed_precision``); ``--fp16`` on an fp32 graph converts it first (beside it, as
``NAME.fp16.onnx``) and says so. The network is created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (required on 10.12-10.x; deprecated and ignored on
11.x, where strong typing is always on).

Fusions may still compute an island otherwise (a fused region picks its own internal precision), so
the only proof that a plan is right is its outputs: ``export.verify`` compares them per tap with the
fp32 graph on real inputs where the plan is built and writes the cosines into the header
(``verified_cosine``).

The plan file is ``formats.plan.PLAN_MAGIC`` + a JSON header (the export metadata, the TensorRT
version, GPU architecture, profile, build summary and the baked prompt embedding, which becomes a
plain input because TensorRT treats initializers as weights) + the serialized engine.

Everything that does not need TensorRT (argument checks, profiles, the summary, the container) is
a plain function tested on the CPU; the build itself is tested against a fake of TensorRT's Python
API in its 11.4 and 10.12 forms (tests/fake_tensorrt.py). The fake and every TensorRT name this
module and the runtime backend use are checked against the real bindings of 10.12 and 11.4
(tests/export/test_trt_real_bindings.py): the supported range ``TENSORRT_RANGE`` is what was checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from ..checkpoint import atomic_write_bytes
from ..formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, parse_batch, read_onnx_info
from ..formats.plan import encode_array, plan_header_bytes
from .onnx_export import write_fp16_onnx

TENSORRT_RANGE = ">=10.12,<12"

DEFAULT_BATCH = "1:4:8"
DEFAULT_WORKSPACE_GB = 8.0


class BuildUnavailable(RuntimeError):
    """TensorRT or a GPU is missing: the message is the one line the CLI prints."""


def check_build_environment():
    """(tensorrt module, (major, minor) GPU capability, GPU name), or ``BuildUnavailable`` saying what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BuildUnavailable(f"TensorRT is not installed (pip install 'tensorrt{TENSORRT_RANGE}' on a machine with an "
                               "NVIDIA GPU); nothing was built") from None
    version = tuple(int(p) for p in tensorrt.__version__.split(".")[:2] if p.isdigit())
    if version < (10, 12):
        raise BuildUnavailable(f"TensorRT {tensorrt.__version__} is too old: strongly typed fp16 builds need "
                               f"tensorrt{TENSORRT_RANGE}; nothing was built")
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


def build_engine(onnx_path, out, *, fp16: bool = False, batch: str | None = None, timing_cache=None,
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, verify: bool = True, reference=None,
                 min_cosine: float | None = None, log=print) -> dict:
    """Build ``out`` from ``onnx_path``; returns the build summary.

    Precision comes from the graph: an fp16 export builds an fp16 plan with its fp32 islands, an
    fp32 export an fp32 plan; ``fp16=True`` on an fp32 graph converts it first (``NAME.fp16.onnx``
    beside it). ``verify`` compares the plan per tap with the fp32 reference (``reference``, default
    the fp32 graph the fp16 file names) and records the cosines in the header; a plan below
    ``min_cosine`` is written as ``NAME.unverified.plan`` and ``VerificationFailed`` raised.
    Host-side checks run before TensorRT is needed; the timing cache is written after the plan.
    """
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise ValueError(f"{onnx_path} does not exist")
    if out.suffix != ".plan":
        raise ValueError(f"output {out} must end in .plan (the Engine picks the backend from the suffix)")
    info = read_onnx_info(onnx_path)
    if info.extra.get("precision") == "int8":  # TensorRT's explicit quantization of it was never built or checked
        raise ValueError(f"{onnx_path.name} is an int8 graph for the CPU (OpenVINO, ONNX Runtime): build the plan "
                         f"from the fp32 graph it was quantized from ({info.extra.get('fp32_reference')}), with --fp16")
    batch_range = parse_batch(batch) if batch else (info.batch if info.batch.get("max") else parse_batch(DEFAULT_BATCH))
    profile_shapes(info, batch_range)
    workspace_gb = check_workspace(workspace_gb)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None and cache_path.is_dir():
        raise ValueError(f"--timing-cache {cache_path} is a folder: give a file path")
    if verify:
        from .verify import reference_for

        reference = reference_for(onnx_path, info, reference)
    trt, capability, gpu_name = check_build_environment()

    if fp16 and info.extra.get("precision", "fp32") == "fp32":
        converted = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
        log(f"{onnx_path.name} is an fp32 graph and TensorRT engines are strongly typed: converting it to fp16 with "
            f"fp32 islands as {converted.name} (`python export/export_onnx.py ... --precision fp16` does this at "
            "export)")
        write_fp16_onnx(onnx_path, converted, log=log)
        onnx_path, info = converted, read_onnx_info(converted)
    is_fp16 = info.extra.get("precision", "fp32") == "fp16"

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
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
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(info, batch_range).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = _timing_cache(config, cache_path, log)

    log(f"building {out.name} for {gpu_name} (sm_{capability[0]}{capability[1]}), strongly typed "
        f"{'fp16 with fp32 islands' if is_fp16 else 'fp32'}, batch {batch_range['min']}:{batch_range['opt']}:"
        f"{batch_range['max']}; this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_bytes = bytes(serialized)
    build_seconds = time.perf_counter() - t0

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError("TensorRT could not load the engine it just built (see its log above)")
    inspector = engine.create_engine_inspector()
    mix = precision_mix(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    summary = {"network_layers": network.num_layers, "engine_layers": engine.num_layers, "precision_mix": mix,
               "engine_bytes": len(engine_bytes), "build_seconds": round(build_seconds, 1)}
    header = plan_header(info, trt.__version__, capability, gpu_name, batch_range, is_fp16, workspace_gb,
                         default_embeds, summary, onnx_path.name, len(engine_bytes))
    del engine, runtime
    if verify:
        from .verify import VerificationFailed, verify_plan

        staged = out.with_name(out.stem + ".unverified.plan")
        write_plan(staged, header, engine_bytes)
        try:
            header["verified_cosine"], passed = verify_plan(staged, reference, min_cosine, log=log)
            header["verified_against"] = Path(reference).name
            write_plan(staged, header, engine_bytes)
            if not passed:
                raise VerificationFailed(f"{staged} differs from {Path(reference).name} beyond the threshold (per-tap "
                                         f"cosine {header['verified_cosine']}); the plan is kept there for inspection, "
                                         "not at --out")
            os.replace(staged, out)
        finally:
            _save_timing_cache(cache, cache_path, log)
    else:
        write_plan(out, header, engine_bytes)
        _save_timing_cache(cache, cache_path, log)
    log(format_summary(summary))
    return summary


def _timing_cache(config, path: Path | None, log):
    """The cache object the build uses: read from ``path`` when it exists and matches, else empty."""
    blob = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"timing cache {path} was made for another GPU or TensorRT version: starting a new one")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise RuntimeError("TensorRT refused an empty timing cache (see its log above)")
    return cache


def _save_timing_cache(cache, path: Path | None, log) -> None:
    """After the plan is safe: a cache that cannot be written costs the next build time, never this one."""
    if path is None:
        return
    try:
        payload = bytes(cache.serialize())
        atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(payload))
    except (OSError, RuntimeError, TypeError) as exc:
        log(f"warning: the plan is built, but the timing cache could not be written to {path}: {exc}")


def plan_header(info: ArtifactInfo, trt_version: str, capability, gpu_name: str, batch: dict, fp16: bool,
                workspace_gb: float, default_embeds, summary: dict, onnx_name: str, engine_bytes: int) -> dict:
    """Everything the runtime and ``describe`` need, without TensorRT."""
    plan_info = dataclasses.replace(info, batch=dict(batch),
                                    extra=dict(info.extra, precision="fp16+fp32" if fp16 else "fp32"))
    plan_info.extra.pop("precision_policy", None)  # the graph's node counts say nothing about the engine
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
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(plan_header_bytes(header))
            f.write(engine_bytes)

    atomic_write_bytes(Path(out), write)


def format_summary(summary: dict) -> str:
    mix = ", ".join(f"{k} {v}" for k, v in sorted(summary["precision_mix"].items()))
    return (f"engine: {summary['engine_layers']} layers ({mix}), {summary['engine_bytes'] / 2**20:.1f} MiB, "
            f"built in {summary['build_seconds']:.0f} s")
