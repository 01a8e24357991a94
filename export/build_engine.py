"""Build a TensorRT fp16 plan from an exported ONNX feature graph (strongly typed, TensorRT 10.12 to 11.x).

    python export/export_onnx.py --student s.safetensors --base sd21/ --out sd21.onnx --size 768 768 --precision fp16
    python export/build_engine.py --onnx sd21.onnx --out sd21.plan --batch 1:4:8 --timing-cache sd21.cache

The same as ``cleandift-rt build-plan`` (flags and code in ``cleandift_rt.cli.export``). Needs
TensorRT and an NVIDIA GPU; exit status 2 for argument and file errors, 3 when TensorRT or the GPU
is missing, 4 for a plan that fails verification (kept as OUT.unverified.plan). See docs/engine.md.
"""

import sys

from cleandift_rt.cli.export import build_plan_main as main

if __name__ == "__main__":
    sys.exit(main())
