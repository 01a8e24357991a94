"""Engine backends: ONNX Runtime and OpenVINO (``.onnx``), TensorRT (``.plan``), PyTorch (student
files, Robot-DIFT packages).

Every backend is a ``Backend`` (``common``: the protocol and the helpers several backends share):
it takes prepared pixels (``B x 3 x H x W`` float32 in [-1, 1], from
``preprocess.prepare_images``), checked prompt embeddings or None and a selection of its outputs,
and returns ``{name: tensor}``; the Engine above them does input handling and its checks, batch
splitting and streaming, so a backend checks none of it again.
"""

from .common import Backend

__all__ = ["Backend"]
