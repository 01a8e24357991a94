"""``cleandift-rt``: the command line. Every subcommand's ``--help`` shows a worked example.

Each command group is one module of this package that adds its commands to the parser with
``register(sub)``; this module only assembles them (``COMMANDS``). Errors in what the user passed (missing files, wrong taps, bad
sizes) end with one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import (bench, compare, demo, encoder, evaluate, explore, export, extract, gate, hyper, info, pictures, probes,
               serve, track, train)
from .common import Parser, UserError

DESCRIPTION = """\
cleandift-rt: noise-free dense features from Stable Diffusion U-Nets (CleanDIFT), fast.

Start here (no weights needed, about a minute on a laptop CPU):
  cleandift-rt demo --out demo/          builds a tiny untrained model, exports it to ONNX,
                                         extracts features and writes match / PCA pictures

With a real model (a CleanDIFT student exported by `cleandift-rt export-onnx`):
  cleandift-rt info sd21.onnx                            what the file holds (taps, size, prompt)
  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out matches.png
  cleandift-rt pca a.jpg b.jpg --engine sd21.onnx --out pca.png
  cleandift-rt extract photos/ --engine sd21.onnx --out feats/ --taps us6
  cleandift-rt eval-spair --root SPair-71k --engine sd21.onnx --base sd21/ --out results.json \\
      --baseline dift
An engine is an .onnx file, a TensorRT .plan, or a student .safetensors file (then pass --base,
the base model folder that provides the VAE and text encoder). Make one with
  cleandift-rt train --base sd21/ --data images/ --out runs/sd21
  cleandift-rt export-onnx --student runs/sd21/student_unet.safetensors --base sd21/ --out sd21.onnx
  cleandift-rt build-plan --onnx sd21.onnx --out sd21.plan              (TensorRT, NVIDIA GPU)
"""

# In the order ``--help`` lists them: start here, use an engine, measure it, make one, then the systems
# built on the features.
COMMANDS = (demo, pictures, explore, extract, info, compare, bench, evaluate, train, encoder, export, serve, hyper, gate,
            probes, track)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cleandift-rt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):  # nothing asked: show what can be, and fail like argparse does
        parser.print_help(sys.stderr)
        print("\nerror: name a command (e.g. cleandift-rt demo --out demo/)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, OSError, ImportError, RuntimeError, ArithmeticError, MemoryError) as exc:
        if os.environ.get("CLEANDIFT_RT_DEBUG"):
            raise
        print(f"error: {str(exc) or type(exc).__name__}", file=sys.stderr)
    except KeyboardInterrupt:  # commands with --resume continue only when asked to
        again = "the same command plus --resume" if hasattr(args, "resume") else "the same command"
        print(f"interrupted; rerun {again} to resume", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
