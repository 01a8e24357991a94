"""Formats: what an exported feature engine is, written into the file itself.

Owns the self-description every exported file carries (``ArtifactInfo``: taps, sizes, batch range,
prompt, timestep, versions) as ONNX ``metadata_props`` and as the JSON header of the TensorRT
``.plan`` container, and ``describe(path)``, which reads any engine file without a runtime or a
GPU. Export writes these formats and every runtime reads them, so they sit below both. It may
import ``features`` (the input-size rules), ``models`` and the top-level shared modules.
"""

from .artifact import ArtifactInfo, describe, read_info, read_onnx_info, read_plan_header

__all__ = ["ArtifactInfo", "describe", "read_info", "read_onnx_info", "read_plan_header"]
