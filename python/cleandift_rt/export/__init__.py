"""Export: a CleanDIFT student to self-describing engine files.

Owns the ONNX export (image -> VAE encoder -> student U-Net -> one named output per tap, ending at
the last requested tap, then the outputs derived from taps it was given, ``formats.derived``) and
the TensorRT plan build. The scripts ``export/export_onnx.py`` and
``export/build_engine.py`` at the top of the repository are thin entry points over this package.
It writes the ``formats`` it shares with the runtime, may run engines through ``runtime`` to check
what it built, and may import ``features``, ``models`` and the top-level shared modules.
"""
