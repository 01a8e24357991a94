"""Build a TensorRT fp16 plan from an exported ONNX feature graph.

    python export/build_engine.py --onnx sd21.onnx --out sd21.plan --fp16 --batch 1:4:8 --timing-cache sd21.cache

Needs TensorRT >= 10 and an NVIDIA GPU; without them it says which is missing and exits with
status 3 (argument and file errors exit with 2). See docs/engine.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="model exported by export/export_onnx.py")
    p.add_argument("--out", required=True, help="output .plan path")
    p.add_argument("--fp16", action="store_true", help="fp16 kernels, fp32 kept for attention scores and norms")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="optimisation profile batch range (default: the export's, else 1:4:8)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="read and update this TensorRT timing cache")
    p.add_argument("--workspace", type=float, default=8.0, metavar="GB", help="builder workspace limit in GiB")
    args = p.parse_args(argv)

    from cleandift_rt.export.trt_build import BuildUnavailable, build_engine

    try:
        build_engine(args.onnx, args.out, fp16=args.fp16, batch=args.batch, timing_cache=args.timing_cache,
                     workspace_gb=args.workspace)
    except BuildUnavailable as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:  # bad arguments, unreadable inputs, unwritable output
        print(f"build_engine: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
