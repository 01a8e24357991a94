"""OpenVINO backend for exported ``.onnx`` feature graphs, on the CPU, in fp32, native bf16 or int8.

- **Compiled once** per (file, the sizes and modification times of it and its ``.data`` weights,
  precision, threads) in this process: Engines opening the same file with the same options share
  one compiled model (held weakly, so it is freed with the last Engine that uses it).
- **Precision** is always set explicitly through ``INFERENCE_PRECISION_HINT``: ``"f32"`` for
  fp32, since OpenVINO's CPU plugin itself defaults to bf16 on CPUs with AVX512_BF16 or AMX, and
  ``"bf16"`` only where the Engine found native bf16. ``describe()`` reports the hint the
  compiled model holds and the precision its convolutions and matrix products actually run in.
- **int8 files** (the QDQ graphs of ``export.int8``): the quantized convolutions and matrix products
  run in int8 (VNNI / AMX-INT8), the layers kept in floating point under the bf16 hint where the CPU
  has native bf16, else f32, as they were validated at export. ``describe()["layer_precision"]``
  lists the precision each convolution and matrix product runs in (OpenVINO's runtime model).
- **prompt_embeds**: OpenVINO's ONNX reader turns an input that is also an initializer (our baked
  prompt) into a Constant, which would make the prompt unchangeable. The backend turns that
  Constant back into a Parameter ``[E, L, D]`` before compiling and feeds the Constant's value
  (the baked default) when the caller passes no embeddings.
- **Timestep embedding**: the U-Net broadcasts its constant timestep to the batch before the
  sinusoidal embedding, so OpenVINO computes that embedding at run time, in bf16 under the bf16
  hint, where t = 261 rounds to 260 (the time embedding came out at cosine 0.956 to fp32 and the
  deepest taps at 0.994 on the tiny model). The backend feeds the embedding the unbroadcast
  timestep instead: the whole time MLP then folds to a constant, computed in fp32 at compile time
  (deepest taps 0.9965-0.998 on the tiny models; docs/cpu.md).
- **Thread safety**: a pool of infer requests; a call takes an idle one (or makes one), so
  concurrent calls run side by side, each on its own request, and never share output buffers.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ...formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, check_external_data, read_onnx_info
from ...kernels.precision import cpu_feature_names
from ..quantized import float_layers
from .common import Backend, available_cpus, check_outputs, host_float32

HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision names -> OpenVINO's
COMPUTE_LAYERS = ("Convolution", "MatMul", "FullyConnected", "GroupConvolution", "Deconvolution")
INT8_PRECISIONS = ("i8", "u8")  # what OpenVINO's runtime model says of a layer that runs in int8


def hint_of(precision: str) -> str:
    """OpenVINO's inference precision hint for our precision: an int8 graph's floating-point layers run in
    bf16 where the CPU has it natively, else in fp32 (its quantized layers run int8 either way)."""
    return HINTS[float_layers() if precision == "int8" else precision]


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError("backend 'openvino' needs OpenVINO: pip install openvino (CPU; runs .onnx files in fp32 "
                          "or, on CPUs with AVX512_BF16 or AMX, in native bf16)") from None
    return openvino


class _Compiled:
    """One compiled model and what the backends need to run it (weakly cached, see below)."""

    def __init__(self, compiled, default_embeds: np.ndarray, outputs: dict, folded: int):
        self.model, self.default_embeds, self.outputs, self.folded = compiled, default_embeds, outputs, folded


_compiled: "weakref.WeakValueDictionary[tuple, _Compiled]" = weakref.WeakValueDictionary()
_compiled_lock = threading.Lock()


def _prompt_as_parameter(ov, model, path: Path) -> np.ndarray:
    """Make ``prompt_embeds`` a graph input again; return the baked default it held."""
    params = [p for p in model.get_parameters() if EMBEDS_INPUT in p.output(0).get_names()]
    consts = [op for op in model.get_ops()
              if op.get_type_name() == "Constant" and EMBEDS_INPUT in op.output(0).get_names()]
    if params and not consts:  # a graph whose prompt is a plain input has no baked default
        raise ValueError(f"{path} has no baked '{EMBEDS_INPUT}' default: export it with export/export_onnx.py")
    if not consts:
        raise ValueError(f"{path} lacks the input '{EMBEDS_INPUT}': not a cleandift-rt feature graph")
    const = consts[0]
    default = np.array(const.get_data(), dtype=np.float32, copy=True)
    param = ov.opset13.parameter(ov.PartialShape([-1, -1, default.shape[-1]]), ov.Type.f32, name=EMBEDS_INPUT)
    param.output(0).get_tensor().set_names({EMBEDS_INPUT})
    for consumer in list(const.output(0).get_target_inputs()):
        consumer.replace_source_output(param.output(0))
    model.add_parameters([param])
    model.validate_nodes_and_infer_types()
    return default


def _fold_timestep_embedding(model) -> int:
    """Feed every sinusoidal embedding (Sin / Cos) the constant it broadcasts to the batch, so that it
    folds to an fp32 constant; returns how many broadcasts were bypassed."""
    bypassed = 0
    for op in model.get_ops():
        if op.get_type_name() not in ("Sin", "Cos"):
            continue
        stack = [(op, 0)]
        while stack:
            node, depth = stack.pop()
            if node.get_type_name() == "Broadcast" and node.input_value(0).get_node().get_type_name() == "Constant":
                for consumer in list(node.output(0).get_target_inputs()):  # broadcasting downstream does the rest
                    consumer.replace_source_output(node.input_value(0))
                    bypassed += 1
            elif depth < 8 and node.get_type_name() not in ("Constant", "Parameter"):
                stack.extend((node.input_value(i).get_node(), depth + 1) for i in range(node.get_input_size()))
    if bypassed:
        model.validate_nodes_and_infer_types()
    return bypassed


def compile_onnx(path: Path, precision: str, threads: int) -> _Compiled:
    """The compiled model of ``path`` for (precision, threads), shared while any Engine holds it."""
    ov = import_openvino()
    files = [f for f in (path, path.with_name(path.name + ".data")) if f.exists()]  # the graph and its weights
    key = (str(path.resolve()), *((f.stat().st_size, f.stat().st_mtime_ns) for f in files), precision, threads)
    with _compiled_lock:  # one compile per key even when Engines open concurrently
        hit = _compiled.get(key)
        if hit is not None:
            return hit
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except RuntimeError as exc:
            raise ValueError(f"OpenVINO cannot read {path}: {str(exc).strip().splitlines()[0]}") from None
        if IMAGE_INPUT not in {n for p in model.get_parameters() for n in p.output(0).get_names()}:
            raise ValueError(f"{path} lacks the input '{IMAGE_INPUT}': not a cleandift-rt feature graph")
        default = _prompt_as_parameter(ov, model, path)
        folded = _fold_timestep_embedding(model)
        config = {"INFERENCE_PRECISION_HINT": hint_of(precision), "INFERENCE_NUM_THREADS": int(threads),
                  "PERFORMANCE_HINT": "LATENCY"}
        try:
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise ValueError(f"OpenVINO cannot compile {path}: {str(exc).strip().splitlines()[0]}") from None
        outputs = {name: out for out in compiled.outputs for name in out.get_names()}
        entry = _Compiled(compiled, default, outputs, folded)
        _compiled[key] = entry
        return entry


def layer_precisions(compiled) -> dict[str, str]:
    """``{layer: precision it runs in}`` of the convolution / matrix-product layers (OpenVINO's runtime model)."""
    out = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if str(info["layerType"].astype(str)) in COMPUTE_LAYERS:
            out[op.get_friendly_name()] = str(info["runtimePrecision"].astype(str))
    return out


class OpenVINOBackend(Backend):
    name = "openvino"  # the graph's batch axis is dynamic (min_batch 1, max_batch None): the Engine may still split

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None,
                 precision: str = "fp32"):
        ov = import_openvino()
        self.path = Path(path)
        if device is not None and not device.startswith("cpu"):
            raise ValueError(f"backend 'openvino' runs on the CPU, not {device!r}: for CUDA use backend='onnxruntime' "
                             "(with onnxruntime-gpu) or a TensorRT plan")
        if precision not in (*HINTS, "int8"):
            raise ValueError(f"backend 'openvino' runs 'fp32', 'bf16' or (int8 files) 'int8', not {precision!r}")
        self.info: ArtifactInfo = read_onnx_info(self.path)
        check_external_data(self.path)
        self.threads = int(threads) if threads else available_cpus()
        self._entry = compile_onnx(self.path, precision, self.threads)
        check_outputs(self.path, self.info, self._entry.outputs)
        compiled = self._entry.model
        hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32" / "bf16"
        if hint != hint_of(precision):
            raise RuntimeError(f"OpenVINO compiled {self.path} for {hint} although {precision} was asked for")
        layers = layer_precisions(compiled)
        self.precision = {v: k for k, v in HINTS.items()}.get(hint, hint)
        if precision == "int8" and any(p in INT8_PRECISIONS for p in layers.values()):
            self.precision = "int8"  # else OpenVINO runs none of it in int8 here: info says what ran
        self.device = torch.device("cpu")
        core = ov.Core()
        self._described = {
            "backend": self.name, "device": "cpu", "precision": self.precision, "threads": self.threads,
            "openvino": ov.get_version(), "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            "cpu_features": list(cpu_feature_names()),
            "openvino_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "openvino_hint": hint, "compute_precision": dict(Counter(layers.values())), "layer_precision": layers,
            "timestep_embedding": "folded to an fp32 constant" if self._entry.folded else "computed at run time"}
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def describe(self) -> dict:
        return dict(self._described)

    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps) -> dict[str, torch.Tensor]:
        feeds = {IMAGE_INPUT: host_float32(pixels),
                 EMBEDS_INPUT: self._entry.default_embeds if embeds is None else host_float32(embeds)}
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._entry.model.create_infer_request()
        try:
            # share_inputs: read in place (the arrays outlive the synchronous call); outputs are
            # copied out of the request's buffers, which the next call on this request reuses
            result = request.infer(feeds, share_inputs=True, share_outputs=False)
            out = {t: torch.from_numpy(np.asarray(result[self._entry.outputs[t]])) for t in taps}
        finally:
            self._idle.put(request)
        return out
