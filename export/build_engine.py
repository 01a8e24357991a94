"""Build a TensorRT fp16 plan from an exported ONNX feature graph (strongly typed, TensorRT 10.12 to 11.x).

    python export/export_onnx.py --student s.safetensors --base sd21/ --out sd21.onnx --size 768 768 --precision fp16
    python export/build_engine.py --onnx sd21.onnx --out sd21.plan --batch 1:4:8 --timing-cache sd21.cache

Precision comes from the ONNX graph (TensorRT 11 has no fp16 builder flag): the fp16 export builds
an fp16 plan; --fp16 on an fp32 graph converts it first. The plan is checked per tap against the
fp32 reference before it is written (--no-verify skips that). Needs TensorRT and an NVIDIA GPU;
without them it says which is missing and exits with status 3 (argument and file errors: 2; a plan
that fails verification: 4, kept as OUT.unverified.plan). See docs/engine.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True, help="model exported by export/export_onnx.py")
    p.add_argument("--out", required=True, help="output .plan path")
    p.add_argument("--fp16", action="store_true", help="an fp16 plan also from an fp32 graph (converted first to "
                   "NAME.fp16.onnx with fp32 islands); an fp16 export is fp16 without it")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="optimisation profile batch range (default: the export's, else 1:4:8)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="read and update this TensorRT timing cache")
    p.add_argument("--workspace", type=float, default=8.0, metavar="GB", help="builder workspace limit in GiB")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the plan with the fp32 graph per tap on the bundled photos and record the cosines "
                   "in its header as verified_cosine (default on; the build needs the GPU it runs on)")
    p.add_argument("--reference", metavar="FILE", help="fp32 ONNX to verify against (default: the fp32 export the "
                   "fp16 file's metadata names, or the graph itself when it is fp32)")
    p.add_argument("--min-cosine", type=float, metavar="C", help="per-tap cosine a plan must reach (default 0.995 "
                   "for fp16 plans, 0.999 for fp32)")
    args = p.parse_args(argv)

    from cleandift_rt.export.trt_build import BuildUnavailable, build_engine
    from cleandift_rt.export.verify import VerificationFailed

    try:
        build_engine(args.onnx, args.out, fp16=args.fp16, batch=args.batch, timing_cache=args.timing_cache,
                     workspace_gb=args.workspace, verify=args.verify, reference=args.reference,
                     min_cosine=args.min_cosine)
    except BuildUnavailable as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 3
    except VerificationFailed as exc:
        print(f"build_engine: {exc}", file=sys.stderr)
        return 4
    except (ValueError, OSError) as exc:  # bad arguments, unreadable inputs, unwritable output
        print(f"build_engine: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
