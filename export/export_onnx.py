"""Export a CleanDIFT student to one ONNX graph: image -> VAE encoder -> student U-Net -> named taps.

    python export/export_onnx.py --student student_unet.safetensors --base sd21/ --out sd21.onnx --size 768 768
    python export/export_onnx.py ... --taps us6 --dynamic-size 512 1024 --batch 1:4:8 --prompt ""
    python export/export_onnx.py ... --precision fp16      # for TensorRT: fp16 with fp32 islands, and OUT.fp32.onnx
    python export/export_onnx.py ... --aggregator runs/hyper/aggregator.safetensors   # + the 'hyper' output

Input ``images``: float32 N x 3 x H x W RGB in [-1, 1] (``cleandift_rt.Engine`` prepares it from
PIL/uint8/float input); optional input ``prompt_embeds`` replaces the baked prompt's embedding.
See docs/engine.md.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    from cleandift_rt.taps import TAPS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="student _unet/_full .safetensors file, or a diffusers folder")
    p.add_argument("--base", required=True, help="base model folder (VAE, text encoder) the student was trained from")
    p.add_argument("--out", required=True, help="output .onnx path (weights go to OUT.data when > 2 GB)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="fixed input size (multiples of 64)")
    size.add_argument("--dynamic-size", type=int, nargs=2, metavar=("MIN", "MAX"),
                      help="dynamic H and W within [MIN, MAX] (multiples of 64)")
    p.add_argument("--taps", nargs="+", choices=TAPS, default=None, help="taps to output (default: all 11)")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="batch range recorded for TensorRT profiles (the ONNX batch axis is always dynamic)")
    p.add_argument("--prompt", default="", help='prompt whose embedding is baked in (default "")')
    p.add_argument("--resize", default="stretch", choices=("stretch", "pad"), help="size policy the Engine applies")
    p.add_argument("--external-data", action="store_true", help="always keep weights in OUT.data (default: > 2 GB)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: weights and activations in fp16 with fp32 islands (attention scores, norms, "
                   "image-independent paths, tensors measured beyond the fp16 range on the bundled photos), fp32 "
                   "inputs and outputs; the fp32 graph is kept as OUT.fp32.onnx (the reference build_engine.py "
                   "--verify compares against). Needed for TensorRT's strongly typed fp16 engines")
    p.add_argument("--aggregator", metavar="FILE", help="an aggregator.safetensors (cleandift-rt train-aggregator, "
                   "source cleandift or cleandift-heads): the graph also computes its Diffusion Hyperfeatures "
                   "descriptor, output 'hyper' (heads included)")
    args = p.parse_args(argv)

    from pathlib import Path

    from cleandift_rt.models import load_base, load_student_and_base
    from cleandift_rt.export.onnx_export import check_export_args, export_onnx

    try:
        check_export_args(args.out, args.size, args.dynamic_size, args.taps, args.batch, args.resize, args.precision,
                          aggregator=args.aggregator)
        student, base = load_student_and_base(Path(args.student), load_base(args.base))
        size_arg = args.size
        if size_arg is None and args.dynamic_size is None:
            size_arg = [base.resolution] * 2  # the base model's native size
        export_onnx(student, base, args.out, size=size_arg, dynamic_size=args.dynamic_size, taps=args.taps,
                    batch=args.batch, prompt=args.prompt, resize=args.resize,
                    external_data=True if args.external_data else None, precision=args.precision,
                    aggregator=args.aggregator)
    except (ValueError, OSError) as exc:  # bad arguments, unreadable inputs, unwritable output
        print(f"export_onnx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
