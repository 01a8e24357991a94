"""Export a CleanDIFT student to one ONNX graph: image -> VAE encoder -> student U-Net -> named taps.

    python export/export_onnx.py --student student_unet.safetensors --base sd21/ --out sd21.onnx --size 768 768
    python export/export_onnx.py ... --taps us6 --dynamic-size 512 1024 --batch 1:4:8 --prompt ""
    python export/export_onnx.py ... --precision fp16      # for TensorRT: fp16 with fp32 islands, and OUT.fp32.onnx
    python export/export_onnx.py ... --aggregator runs/hyper/aggregator.safetensors   # + the 'hyper' output

The same as ``cleandift-rt export-onnx`` (flags and code in ``cleandift_rt.cli.export``). Input
``images``: float32 N x 3 x H x W RGB in [-1, 1] (``cleandift_rt.Engine`` prepares it from
PIL/uint8/float input); optional input ``prompt_embeds`` replaces the baked prompt's embedding.
See docs/engine.md.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cleandift_rt.cli.export import export_onnx_main as main  # noqa: E402  (after the offline switch)

if __name__ == "__main__":
    sys.exit(main())
