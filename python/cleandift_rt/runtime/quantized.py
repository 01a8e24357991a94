"""Which backend runs an int8 file, and the refusals that name the command making one.

An int8 file (``export-onnx --precision int8``, ``export.int8``) is a QDQ ``.onnx`` graph. It runs
``"int8"`` on the CPU: OpenVINO by default (its layers kept in floating point in bf16 where the CPU
has native bf16, as they were validated), ONNX Runtime's CPU provider when asked
(``backend="onnxruntime"``). Asking ``precision="int8"`` of any other file is refused with the
command that makes an int8 file; asking another precision of an int8 file names its fp32 graph.
"""

from __future__ import annotations

from pathlib import Path

from ..kernels.precision import native_bf16

MAKE_INT8 = ("cleandift-rt export-onnx --student STUDENT --base BASE --out {name}.int8.onnx --precision int8 "
             "--calibration YOUR_IMAGES/")


def float_layers() -> str:
    """The precision an int8 graph's floating-point layers run in on this CPU (OpenVINO)."""
    return "bf16" if native_bf16() else "fp32"


def int8_choice(path: Path, backend: str | None, device: str | None, precision: str | None, stored: str,
                fp32_reference: str | None = None) -> tuple[str, str] | None:
    """``(backend, "int8")`` for an int8 file (``stored`` is the file's precision), None for other files;
    a ValueError naming the fix for an int8 request that cannot be honoured."""
    if stored != "int8":
        if precision == "int8":
            what = stored if path.suffix == ".onnx" else "not one"
            raise ValueError(f"precision='int8' runs int8 files; {path.name} is {what}: make one with "
                             f"`{MAKE_INT8.format(name=path.stem)}` (docs/cpu.md)")
        return None
    if precision not in (None, "int8"):
        fp32 = f" ({fp32_reference}, written beside it)" if fp32_reference else ""
        raise ValueError(f"{path.name} is an int8 graph: it runs precision 'int8' (or None); for {precision}, open the "
                         f"fp32 graph it was quantized from{fp32}")
    if device is not None and device.startswith("cuda"):
        raise ValueError(f"{path.name} is an int8 graph for the CPU: run it with device='cpu' (OpenVINO, or "
                         "backend='onnxruntime'); on CUDA use a TensorRT plan of the fp16 export")
    return backend or "openvino", "int8"


__all__ = ["MAKE_INT8", "float_layers", "int8_choice"]
