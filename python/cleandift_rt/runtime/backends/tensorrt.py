"""TensorRT backend for ``.plan`` files written by ``export/build_engine.py`` (TensorRT 10.12 to 11.x).

Memory: every I/O tensor has one device buffer sized for the profile's largest batch and the
largest image size; a call binds views at the start of those buffers (``set_tensor_address``),
so addresses never change. Work runs on the backend's own CUDA stream, ordered against the
caller's: the backend stream waits for the caller's current stream before it reads the inputs
(PyTorch streams are non-blocking: ``.float()`` or ``torch.cat`` of the inputs may still run), and
the caller's stream waits for the backend before it touches the outputs, which are recorded on
the caller's stream; there is no host synchronisation. A lock serialises ``run`` calls (the IO
buffers are shared; the GPU is busy anyway).

CUDA graphs (``cuda_graph=True``, fixed-size plans): one execution context per captured shape (a
graph bakes in its context's shapes and scratch), captured with ``capture_error_mode=
"thread_local"`` (Engine.stream copies tensors on another thread meanwhile), the enqueue's result
checked inside the capture; at most ``MAX_GRAPHS`` shapes are kept, least recently used first out.

Nothing here can run on a machine without a GPU and TensorRT; the checks that decide whether a
plan may be loaded (``check_plan_runtime``) are plain functions, unit-tested on the CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ...formats.artifact import EMBEDS_INPUT, IMAGE_INPUT, ArtifactInfo
from ...formats.plan import decode_array, read_plan_header


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ImportError("TensorRT is not installed: `pip install 'tensorrt>=10.12,<12'` on a machine with an NVIDIA "
                          "GPU, or use the .onnx file with ONNX Runtime instead") from None
    return tensorrt


def check_plan_runtime(header: dict, trt_version: str, capability: tuple[int, int] | None, path: str) -> None:
    """A plan runs only with the TensorRT version and GPU architecture it was built for: say which differs."""
    built_with = header.get("tensorrt")
    if built_with != trt_version:
        raise ValueError(f"{path} was built with TensorRT {built_with}, this machine has TensorRT {trt_version}: "
                         "rebuild it with `python export/build_engine.py` here (plans are not portable across versions)")
    if capability is None:
        raise RuntimeError(f"{path} is a TensorRT plan and needs an NVIDIA GPU; none is visible to PyTorch")
    built_for = tuple(header.get("build", {}).get("gpu_capability", ()))
    if built_for != tuple(capability):
        ours = "sm_%d%d" % tuple(capability)
        theirs = "sm_%d%d" % built_for if len(built_for) == 2 else "an unknown GPU"
        raise ValueError(f"{path} was built for {theirs} ({header.get('build', {}).get('gpu_name', '?')}), this GPU is "
                         f"{ours}: rebuild the plan on this GPU")


def _torch_dtype(trt, dtype) -> torch.dtype:
    # every member here exists from 10.12 on (tests/export/test_trt_real_bindings.py checks the real bindings)
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
             trt.DataType.BOOL: torch.bool}
    if dtype not in table:
        raise ValueError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


MAX_GRAPHS = 4  # captured shapes kept (each holds its own execution context and its activations)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, path: str | Path, device: str | None = None, cuda_graph: bool = False):
        self.path = Path(path)
        header, offset, nbytes = read_plan_header(self.path)
        self.info = ArtifactInfo.from_dict(header["info"], str(self.path))
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError(f"{self.path} is a TensorRT plan and needs an NVIDIA GPU; PyTorch sees none")
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT plans run on CUDA devices, not {self.device}")
        check_plan_runtime(header, trt.__version__, torch.cuda.get_device_capability(self.device), str(self.path))
        with open(self.path, "rb") as f:
            f.seek(offset)
            blob = f.read(nbytes)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise ValueError(f"TensorRT could not deserialize {self.path} (corrupt plan?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self.batch = header["profile"]["batch"]  # {"min", "opt", "max"} of the optimisation profile
        self.tokens = int(header["profile"]["tokens"])
        self.cuda_graph = bool(cuda_graph) and not self.info.dynamic_size
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()  # shape -> (context, graph)
        self._lock = threading.Lock()
        self._default_embeds = torch.from_numpy(decode_array(header["default_prompt_embeds"])).to(self.device)
        self._io = self._allocate()

    @property
    def max_batch(self) -> int:
        return int(self.batch["max"])

    @property
    def min_batch(self) -> int:
        return int(self.batch["min"])

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "tensorrt": self._trt.__version__,
                "profile_batch": self.batch, "cuda_graph": self.cuda_graph}

    def _allocate(self) -> dict[str, torch.Tensor]:
        """One flat device buffer per I/O tensor, large enough for the profile's maximum shapes."""
        trt = self._trt
        hi = self.info.size_range[1] if self.info.dynamic_size else None
        h, w = (hi, hi) if hi else (self.info.height, self.info.width)
        b = self.max_batch
        shapes = {IMAGE_INPUT: (b, 3, h, w), EMBEDS_INPUT: (b, self.tokens, self.info.cross_attention_dim)}
        shapes.update({t: (b, *self.info.output_shape(t, h, w)) for t in self.info.output_names})
        buffers = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if name not in shapes:
                raise ValueError(f"{self.path} has an I/O tensor {name!r} that its metadata does not describe")
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            buffers[name] = torch.empty(int(np.prod(shapes[name])), dtype=dtype, device=self.device)
        missing = [t for t in self.info.output_names if t not in buffers]
        if missing:
            raise ValueError(f"{self.path} lacks outputs for taps {missing} listed in its metadata (corrupt plan)")
        return buffers

    def _view(self, name: str, shape) -> torch.Tensor:
        return self._io[name][: int(np.prod(shape))].view(shape)

    def run(self, pixels: torch.Tensor, embeds: torch.Tensor | None, taps) -> dict[str, torch.Tensor]:
        b, _, h, w = pixels.shape
        if not self.min_batch <= b <= self.max_batch:
            raise ValueError(f"batch {b} outside the plan's profile [{self.min_batch}, {self.max_batch}]")
        if embeds is not None and embeds.shape[1] != self.tokens:
            raise ValueError(f"prompt_embeds have {embeds.shape[1]} tokens; this plan was built for {self.tokens}")
        with self._lock, torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # inputs the caller's stream is still writing
            with torch.cuda.stream(self.stream):
                views = {IMAGE_INPUT: self._view(IMAGE_INPUT, (b, 3, h, w)),
                         EMBEDS_INPUT: self._view(EMBEDS_INPUT, (b, self.tokens, self.info.cross_attention_dim))}
                views[IMAGE_INPUT].copy_(pixels, non_blocking=True)
                source = embeds if embeds is not None else self._default_embeds
                views[EMBEDS_INPUT].copy_(source.expand(b, -1, -1), non_blocking=True)
                for name in self.info.output_names:  # every output needs an address, requested or not
                    views[name] = self._view(name, (b, *self.info.output_shape(name, h, w)))
                self._execute((b, h, w), views)
                out = {t: views[t].clone() for t in taps}  # buffers are reused by the next call
            for tensor in (pixels, embeds):
                if tensor is not None and tensor.is_cuda:
                    tensor.record_stream(self.stream)  # the caller may free them while the copies run
            caller.wait_stream(self.stream)
            for tensor in out.values():
                tensor.record_stream(caller)
        return out

    def _bind(self, context, views: dict[str, torch.Tensor]) -> None:
        """Shapes and addresses for one call; the plan must agree with the metadata on every tap's shape."""
        for name in (IMAGE_INPUT, EMBEDS_INPUT):
            if not context.set_input_shape(name, tuple(views[name].shape)):
                raise ValueError(f"TensorRT rejected input shape {tuple(views[name].shape)} for {name!r}")
        for tap in self.info.output_names:
            planned = tuple(context.get_tensor_shape(tap))
            if planned != tuple(views[tap].shape):
                raise RuntimeError(f"{self.path}: TensorRT computes tap {tap!r} as {planned}, the metadata says "
                                   f"{tuple(views[tap].shape)} (corrupt or mismatched plan): rebuild it")
        for name, view in views.items():
            if not context.set_tensor_address(name, view.data_ptr()):  # unknown name or misaligned address
                raise RuntimeError(f"TensorRT refused the buffer of {name!r} for {self.path} (see its log above)")

    def _execute(self, key: tuple, views: dict[str, torch.Tensor]) -> None:
        handle = self.stream.cuda_stream
        if not self.cuda_graph:
            self._bind(self.context, views)
            if not self.context.execute_async_v3(handle):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
            return
        if key in self._graphs:
            self._graphs.move_to_end(key)
            self._graphs[key][1].replay()
            return
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        context = self.engine.create_execution_context()
        self._bind(context, views)
        # one ordinary launch first: TensorRT finishes its lazy set-up outside the capture
        if not context.execute_async_v3(handle):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            captured = context.execute_async_v3(handle)
        if not captured:
            raise RuntimeError("TensorRT could not enqueue inside the CUDA graph capture; use cuda_graph=False")
        self._graphs[key] = (context, graph)  # this call's outputs came from the ordinary launch
