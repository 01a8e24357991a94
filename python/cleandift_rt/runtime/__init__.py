"""Runtime: ``Engine``, one object for every way of running an exported or PyTorch feature extractor.

Owns the Engine (input handling, tap checks, batch splitting, streaming, the output convention),
its side of the outputs derived from taps (``derived``: computing those given to it, e.g. the
hyperfeatures aggregator, which it knows only through ``formats.derived``) and its backends
(``backends``: the ``Backend`` protocol; ONNX Runtime and OpenVINO for ``.onnx``, TensorRT for
``.plan``, PyTorch for student files). It reads engine files through ``formats`` and runs the
PyTorch path through ``features``; it may import those, ``kernels``, ``models`` and the top-level
shared modules.
"""

from .engine import Engine, StreamResult

__all__ = ["Engine", "StreamResult"]
