"""Formats: what an exported feature engine is, written into the file itself.

Owns the self-description every exported file carries (``ArtifactInfo``: taps, sizes, batch range,
prompt, timestep, derived outputs, versions) as ONNX ``metadata_props`` and as the JSON header of
the TensorRT ``.plan`` container, ``describe(path)``, which reads any engine file without a runtime
or a GPU, and what an output derived from taps is (``derived``: the ``DerivedOutput`` protocol, its
file record, the options such as ``aggregator=`` that open one from a file, registered by the
subpackage owning that file kind). Export writes these formats and every runtime reads them, so
they sit below both. It may
import ``features`` (the input-size rules), ``models`` and the top-level shared modules.
"""

from .artifact import ArtifactInfo, describe, read_info, read_onnx_info, read_plan_header

__all__ = ["ArtifactInfo", "describe", "read_info", "read_onnx_info", "read_plan_header"]
