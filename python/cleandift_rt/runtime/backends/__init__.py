"""Engine backends: ONNX Runtime and OpenVINO (``.onnx``), TensorRT (``.plan``), PyTorch (student files).

Every backend takes prepared pixels (``B x 3 x H x W`` float32 in [-1, 1], from
``preprocess.prepare_images``), optional prompt embeddings and a tap selection, and returns
``{tap: tensor}``; the Engine above them does input handling, batch splitting and streaming.
"""
