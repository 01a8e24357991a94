"""ONNX Runtime backend for exported ``.onnx`` feature graphs.

Provider choice: TensorRT, then CUDA, then CPU, among those this onnxruntime build offers (or the
CPU alone with ``device="cpu"``). onnxruntime-gpu without CUDA libraries logs and silently runs
on the CPU, so what is reported (and checked against an explicit ``device="cuda"``) is
``session.get_providers()``, i.e. what actually runs.

The TensorRT provider gets the optimisation profile of the file's batch and size range, so a new
batch size does not trigger a minutes-long engine rebuild; its precision is the graph's (the fp16
export for fp16), never ``trt_fp16_enable`` on an fp32 graph, which would drop the fp32 islands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo, check_external_data, read_onnx_info
from ...formats.quantized import file_precision
from .common import Backend, available_cpus, check_outputs, host_float32

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"running .onnx engines on ONNX Runtime needs onnxruntime ({exc}): pip install "
                          "'cleandift-rt[cpu]' (the CPU build) or 'cleandift-rt[gpu]' (onnxruntime-gpu, CUDA and "
                          "TensorRT providers); never both") from None
    return onnxruntime


DEFAULT_PROFILE_MAX_BATCH = 8  # ONNX exports take any batch; the TensorRT provider needs a range


def trt_profile(info: ArtifactInfo) -> dict[str, str]:
    """The TensorRT provider's profile options ("name:dims,..." min / opt / max) for a feature graph."""
    batch = info.batch
    hi = batch.get("max") or max(DEFAULT_PROFILE_MAX_BATCH, batch.get("opt") or 1)
    batches = (batch.get("min") or 1, batch.get("opt") or 1, hi)
    if info.dynamic_size:
        lo_side, hi_side = info.size_range
        sizes = ((lo_side, lo_side), tuple(info.default_size), (hi_side, hi_side))
    else:
        sizes = ((info.height, info.width),) * 3
    tokens, dim = info.prompt_tokens, info.cross_attention_dim

    def shapes(b, hw):
        return f"{IMAGE_INPUT}:{b}x3x{hw[0]}x{hw[1]},{EMBEDS_INPUT}:{b}x{tokens}x{dim}"

    return {f"trt_profile_{kind}_shapes": shapes(b, hw) for kind, b, hw in zip(("min", "opt", "max"), batches, sizes)}


def choose_providers(device: str | None, available: list[str], path: Path, device_id: int = 0,
                     profile: dict | None = None) -> list:
    """Providers to request, best first, with their options."""
    if device is not None and device.startswith("cpu"):
        return ["CPUExecutionProvider"]
    wanted = []
    if "TensorrtExecutionProvider" in available:
        cache = path.with_name(path.stem + ".ort-trt-cache")
        wanted.append(("TensorrtExecutionProvider", {
            "device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, **(profile or {})}))
    if "CUDAExecutionProvider" in available:
        wanted.append(("CUDAExecutionProvider", {"device_id": device_id}))
    if device is not None and device.startswith("cuda") and not wanted:
        raise RuntimeError(f"device {device!r} asked for, but this onnxruntime build offers only {available}: "
                           "pip install onnxruntime-gpu (and the CUDA libraries it needs)")
    return wanted + ["CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"  # takes any batch (min_batch 1, max_batch None): the Engine may still split

    def __init__(self, path: str | Path, device: str | None = None, threads: int | None = None):
        ort = import_onnxruntime()
        self.path = Path(path)
        self.info: ArtifactInfo = read_onnx_info(self.path)
        check_external_data(self.path)
        device_id = int(device.split(":")[1]) if device and device.startswith("cuda:") else 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # one op at a time, each using every core we may use: the graph is a chain of big convolutions
        options.intra_op_num_threads = int(threads) if threads else available_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        requested = choose_providers(device, ort.get_available_providers(), self.path, device_id,
                                     trt_profile(self.info))
        # ORT's memory pattern pre-plans one block for all activations: on the CPU it raised the peak
        # from 7.9 to 11.9 GiB at 768 px (SD 2.1 size) for no speed gain, so CPU sessions go without.
        options.enable_mem_pattern = requested != ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=requested)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ValueError(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.providers = self.session.get_providers()
        if device and device.startswith("cuda") and not any(p in self.providers for p in GPU_PROVIDERS):
            raise RuntimeError(f"device {device!r} asked for, but ONNX Runtime runs on {self.providers} "
                               "(CUDA libraries missing?)")
        self.on_gpu = any(p in self.providers for p in GPU_PROVIDERS) and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{device_id}") if self.on_gpu else torch.device("cpu")
        self.threads = options.intra_op_num_threads
        # the baked prompt embedding is an overridable initializer, listed apart from plain inputs
        names = {i.name for i in (*self.session.get_inputs(), *self.session.get_overridable_initializers())}
        missing = {IMAGE_INPUT, EMBEDS_INPUT} - names
        if missing:
            raise ValueError(f"{self.path} lacks the input(s) {sorted(missing)}: not a cleandift-rt feature graph")
        check_outputs(self.path, self.info, {o.name for o in self.session.get_outputs()})

    def describe(self) -> dict:
        d = {"backend": self.name, "providers": self.providers, "threads": self.threads, "device": str(self.device)}
        if file_precision(self.info.extra) == "int8":  # the CPU provider fuses its QDQ pairs into int8 kernels
            d["precision"] = "int8"
        return d

    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps) -> dict[str, torch.Tensor]:
        if self.on_gpu:
            return self._run_bound(pixels, embeds, taps)
        feeds = {IMAGE_INPUT: host_float32(pixels)}
        if embeds is not None:
            feeds[EMBEDS_INPUT] = host_float32(embeds)
        outputs = self.session.run(list(taps), feeds)  # session.run is thread-safe
        return {t: torch.from_numpy(o) for t, o in zip(taps, outputs)}  # zero-copy

    def _run_bound(self, pixels, embeds, taps) -> dict[str, torch.Tensor]:
        """GPU providers: bind torch CUDA memory for inputs and preallocated outputs (no host round trip)."""
        binding = self.session.io_binding()
        keep = []

        def bind_input(name, tensor):
            t = tensor.detach().to(self.device, torch.float32).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", self.device.index or 0, np.float32, list(t.shape), t.data_ptr())

        bind_input(IMAGE_INPUT, pixels)
        if embeds is not None:
            bind_input(EMBEDS_INPUT, embeds)
        b, _, h, w = pixels.shape
        out = {}
        for tap in taps:
            c, fh, fw = self.info.output_shape(tap, h, w)
            out[tap] = torch.empty((b, c, fh, fw), device=self.device, dtype=torch.float32)
            binding.bind_output(tap, "cuda", self.device.index or 0, np.float32, list(out[tap].shape),
                                out[tap].data_ptr())
        # The inputs were written on the caller's stream; ORT's own streams do not wait for it
        # (synchronize_inputs is a no-op on the TensorRT provider), so wait here.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out
