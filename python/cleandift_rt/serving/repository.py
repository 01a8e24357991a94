"""``cleandift-rt export-triton``: a model repository for NVIDIA's Triton Inference Server container.

One model per engine file, ``<out>/<name>/config.pbtxt`` + ``<out>/<name>/1/model.{plan,onnx}``
(+ the ONNX external-data file) + a ``README.md`` with the commands, everything read from the file's
own metadata:

- ``.plan`` -> ``platform: "tensorrt_plan"`` on GPU instances: the raw TensorRT engine (the
  cleandift-rt header stripped), inputs ``images`` FP32 ``[3, H, W]`` and ``prompt_embeds`` FP32
  ``[L, D]`` (a plan takes the text embedding as a plain input: its baked default is written to
  ``warmup/prompt_embeds`` as raw float32, which the warm-up reads and clients may send),
  ``max_batch_size`` and ``preferred_batch_size`` from the plan's optimisation profile, CUDA graphs.
- ``.onnx`` -> ``platform: "onnxruntime_onnx"`` on GPU instances, or on the CPU
  ``backend: "openvino"``; input ``images`` (the baked prompt is an initializer both runtimes use).
- outputs: one FP32 ``[C, h, w]`` per tap in the file (``-1`` where the size is dynamic).
- ``dynamic_batching``, ``instance_group``, ``model_warmup`` (batch 1 and the maximum), and a
  ``parameters`` entry ``cleandift_rt`` holding the metadata a client needs (taps, size, resize
  policy, input range).

The model directory is built beside its target and renamed into place; an existing one is replaced
only when cleandift-rt wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import check_int
from ..formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, check_external_data, read_info
from ..formats.plan import decode_array, read_plan_header
from .repository_readme import readme

PARAMETER_KEY = "cleandift_rt"
DEFAULT_ONNX_MAX_BATCH = 8  # ONNX batch axes are open; Triton needs a number
BACKENDS = {  # backend -> (platform, model file)
    "tensorrt": ("tensorrt_plan", "model.plan"),
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "openvino": (None, "model.onnx"),  # CPU instances only
}


@dataclass
class TritonModel:
    """What ``config.pbtxt`` says, decided from the engine file and the options."""

    name: str
    backend: str
    kind: str  # KIND_GPU / KIND_CPU
    info: ArtifactInfo
    max_batch: int
    preferred: list[int]
    queue_delay_us: int
    instances: int
    embeds_shape: tuple[int, int] | None  # plans take the prompt embedding as an input
    tensorrt: str | None = None
    gpu: str | None = None

    @property
    def image_dims(self) -> list[int]:
        h, w = (self.info.height, self.info.width) if not self.info.dynamic_size else (-1, -1)
        return [3, h, w]

    def output_dims(self, name: str) -> list[int]:
        if self.info.dynamic_size:
            return [self.info.output_shape(name, 64, 64)[0], -1, -1]
        return list(self.info.output_shape(name, self.info.height, self.info.width))


def plan_model(path: Path, name: str, max_batch: int | None, queue_delay_us: int, instances: int) -> TritonModel:
    header, _, _ = read_plan_header(path)
    info = ArtifactInfo.from_dict(header["info"], str(path))
    batch = header["profile"]["batch"]
    lo, opt, hi = int(batch["min"]), int(batch["opt"]), int(batch["max"])
    if lo > 1:
        raise ValueError(f"{path}: its optimisation profile starts at batch {lo}, and Triton's dynamic batcher sends "
                         "batches from 1: rebuild it with --batch 1:OPT:MAX")
    if max_batch is None:
        max_batch = hi
    elif max_batch > hi:
        raise ValueError(f"--max-batch {max_batch} is above the plan's profile maximum {hi}: rebuild with "
                         f"--batch 1:{opt}:{max_batch} or lower --max-batch")
    embeds = decode_array(header["default_prompt_embeds"])
    build = header.get("build", {})
    capability = ".".join(str(v) for v in build.get("gpu_capability", []))
    return TritonModel(name, "tensorrt", "KIND_GPU", info, max_batch, _preferred((opt, hi), max_batch),
                       queue_delay_us, instances, tuple(embeds.shape[-2:]), header.get("tensorrt"),
                       f"{build.get('gpu_name', '?')} (compute {capability or '?'})")


def onnx_model(path: Path, name: str, max_batch: int | None, queue_delay_us: int, instances: int,
               instance_kind: str, backend: str | None) -> TritonModel:
    info = read_info(path)
    backend = backend or ("onnxruntime" if instance_kind == "gpu" else "openvino")
    if backend == "openvino" and instance_kind == "gpu":
        raise ValueError("--backend openvino runs on the CPU: pass --instance-kind cpu (or --backend onnxruntime for "
                         "a GPU)")
    recorded = info.batch.get("max")
    if max_batch is None:
        max_batch = int(recorded) if recorded else DEFAULT_ONNX_MAX_BATCH
    preferred = _preferred((info.batch.get("opt") or max_batch, max_batch), max_batch)
    kind = "KIND_GPU" if instance_kind == "gpu" else "KIND_CPU"
    return TritonModel(name, backend, kind, info, max_batch, preferred, queue_delay_us, instances, None)


def _preferred(sizes, max_batch: int) -> list[int]:
    """Batch sizes the batcher should aim for: the profile's optimum and the maximum (never 1, which would
    send every request alone whenever one is queued)."""
    return sorted({int(s) for s in (*sizes, max_batch) if 1 < int(s) <= max_batch})


def config_text(model: TritonModel) -> str:
    """``config.pbtxt`` in protobuf text format (``inference.ModelConfig`` of Triton's model_config.proto)."""
    platform, filename = BACKENDS[model.backend]
    lines = [f'name: "{model.name}"']
    if platform:
        lines.append(f'platform: "{platform}"')
    lines += [f'backend: "{model.backend}"', f'default_model_filename: "{filename}"',
              f"max_batch_size: {model.max_batch}"]
    inputs = [(IMAGE_INPUT, model.image_dims)]
    if model.embeds_shape:
        inputs.append((EMBEDS_INPUT, list(model.embeds_shape)))
    for name, dims in inputs:
        lines += ["input {", f'  name: "{name}"', "  data_type: TYPE_FP32", f"  dims: {_dims(dims)}", "}"]
    for name in model.info.output_names:
        lines += ["output {", f'  name: "{name}"', "  data_type: TYPE_FP32",
                  f"  dims: {_dims(model.output_dims(name))}", "}"]
    lines += ["dynamic_batching {", *[f"  preferred_batch_size: {size}" for size in model.preferred],
              f"  max_queue_delay_microseconds: {model.queue_delay_us}", "}"]
    lines += ["instance_group {", f"  count: {model.instances}", f"  kind: {model.kind}", "}"]
    if model.backend == "tensorrt":
        lines += ["optimization {", "  cuda {", "    graphs: true", *_graph_specs(model), "  }", "}"]
    for batch in sorted({1, model.max_batch}):
        lines += _warmup(model, batch)
    lines += ["parameters {", f'  key: "{PARAMETER_KEY}"',
              f"  value {{ string_value: {_quote(json.dumps(client_facts(model)))} }}", "}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (ASCII; quotes and backslashes escaped)."""
    return '"' + "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                         ("\\" + c if c in '"\\' else "".join(f"\\{b:03o}" for b in c.encode()))
                         for c in text) + '"'


def _dims(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _graph_specs(model: TritonModel) -> list[str]:
    """Fixed-size plans: Triton captures a graph per batch size by itself. Dynamic-size plans: one graph per
    preferred batch size at the default size (other sizes run without a graph)."""
    if not model.info.dynamic_size:
        return []
    h, w = model.info.default_size
    out = []
    for batch in model.preferred:
        out += ["    graph_spec {", f"      batch_size: {batch}",
                f'      input {{ key: "{IMAGE_INPUT}" value {{ dim: {_dims([3, h, w])} }} }}']
        if model.embeds_shape:
            out.append(f'      input {{ key: "{EMBEDS_INPUT}" value {{ dim: {_dims(model.embeds_shape)} }} }}')
        out.append("    }")
    return out


def _warmup(model: TritonModel, batch: int) -> list[str]:
    h, w = model.info.default_size
    lines = ["model_warmup {", f'  name: "batch_{batch}"', f"  batch_size: {batch}",
             f'  inputs {{ key: "{IMAGE_INPUT}" value {{ data_type: TYPE_FP32 dims: {_dims([3, h, w])} '
             "zero_data: true } }"]
    if model.embeds_shape:
        lines.append(f'  inputs {{ key: "{EMBEDS_INPUT}" value {{ data_type: TYPE_FP32 '
                     f'dims: {_dims(model.embeds_shape)} input_data_file: "{EMBEDS_INPUT}" }} }}')
    return lines + ["}"]


def client_facts(model: TritonModel) -> dict:
    """What a client needs to prepare requests, stored in the config's parameters."""
    info = model.info
    return {"taps": list(info.output_names), "size": info.default_size, "size_range": info.size_range,
            "resize": info.resize, "input": info.input, "prompt_embeds": list(model.embeds_shape or []) or None,
            "package_version": info.package_version, "tensorrt": model.tensorrt}


def export_triton(engine: str | Path, out: str | Path, *, name: str = "cleandift", max_batch: int | None = None,
                  instances: int = 1, queue_delay_us: int = 1000, instance_kind: str = "gpu",
                  backend: str | None = None) -> Path:
    """Write the model ``name`` for ``engine`` into the repository ``out``; returns its directory."""
    engine, out = Path(engine), Path(out)
    if not engine.is_file():
        raise FileNotFoundError(f"{engine} does not exist")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ValueError(f"model name {name!r}: use letters, digits, '-', '_' and '.'")
    if instance_kind not in ("gpu", "cpu"):
        raise ValueError(f"instance kind must be gpu or cpu, got {instance_kind!r}")
    if max_batch is not None:
        max_batch = check_int(max_batch, "--max-batch", 1, 1 << 16)
    instances = check_int(instances, "--instances", 1, 1024)
    queue_delay_us = check_int(queue_delay_us, "--queue-delay-us", 0, 10_000_000)
    if engine.suffix == ".plan":
        if instance_kind != "gpu" or backend not in (None, "tensorrt"):
            raise ValueError(f"{engine.name} is a TensorRT plan: it runs on the GPU with the tensorrt backend only")
        model = plan_model(engine, name, max_batch, queue_delay_us, instances)
    elif engine.suffix == ".onnx":
        if backend not in (None, "onnxruntime", "openvino"):
            raise ValueError(f"--backend {backend}: an .onnx file runs on onnxruntime or openvino")
        model = onnx_model(engine, name, max_batch, queue_delay_us, instances, instance_kind, backend)
    else:
        raise ValueError(f"{engine}: export-triton takes an exported .plan or .onnx file (cleandift-rt export-onnx, "
                         "build-plan)")
    target = out / name
    if target.exists() and not _written_by_us(target):
        raise ValueError(f"{target} exists and was not written by export-triton: choose another --out or --name")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
    try:
        _write_model(staging, engine, model)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=out))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _written_by_us(target: Path) -> bool:
    config = target / "config.pbtxt"
    return config.is_file() and f'key: "{PARAMETER_KEY}"' in config.read_text(errors="replace")


def _write_model(folder: Path, engine: Path, model: TritonModel) -> None:
    version = folder / "1"
    version.mkdir()
    _, filename = BACKENDS[model.backend]
    if model.backend == "tensorrt":
        header, offset, nbytes = read_plan_header(engine)
        with open(engine, "rb") as src, open(version / filename, "wb") as dst:
            src.seek(offset)
            _copy_bytes(src, dst, nbytes)
        embeds = decode_array(header["default_prompt_embeds"]).astype("<f4").reshape(model.embeds_shape)
        (folder / "warmup").mkdir()
        (folder / "warmup" / EMBEDS_INPUT).write_bytes(np.ascontiguousarray(embeds).tobytes())
    else:
        _link_or_copy(engine, version / filename)
        for location in check_external_data(engine):
            _link_or_copy(engine.parent / location, version / location)
    (folder / "config.pbtxt").write_text(config_text(model))
    (folder / "README.md").write_text(readme(model, engine))


def _copy_bytes(src, dst, nbytes: int, chunk: int = 16 << 20) -> None:
    left = nbytes
    while left:
        block = src.read(min(chunk, left))
        if not block:
            raise ValueError("the plan ended before its engine bytes did (truncated file)")
        dst.write(block)
        left -= len(block)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (engines are gigabytes), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
