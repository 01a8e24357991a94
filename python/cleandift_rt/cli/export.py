"""``cleandift-rt export-onnx`` and ``cleandift-rt build-plan``: a student to one ONNX graph, the graph to
a TensorRT plan.

``export/export_onnx.py`` and ``export/build_engine.py`` are thin entry points over the same flags
and code (:func:`export_onnx_main`, :func:`build_plan_main`); they keep their error prefixes
(``export_onnx:``, ``build_engine:``) and exit statuses: 2 for arguments and files, and for
build-plan 3 when TensorRT or the GPU is missing and 4 when the plan fails verification (kept as
``OUT.unverified.plan``); export-onnx ``--precision int8`` likewise 3 without NNCF and 4 when accuracy
control misses the target (kept as ``OUT.unverified.onnx``). The subcommands exit with the same statuses.
"""

from __future__ import annotations

import argparse
import os
import sys

from .common import Parser, add_output_args, add_size_arg, positive_int

EXPORT_DESCRIPTION = """\
Export a CleanDIFT student to one ONNX graph: image -> VAE encoder -> student U-Net -> named taps.

Input `images`: float32 N x 3 x H x W RGB in [-1, 1] (cleandift_rt.Engine prepares it from
PIL/uint8/float input); the optional input `prompt_embeds` replaces the baked prompt's embedding.
See docs/engine.md."""

EXPORT_EXAMPLES = """\
examples:
  cleandift-rt export-onnx --student student_unet.safetensors --base sd21/ --out sd21.onnx --size 768
  cleandift-rt export-onnx ... --taps us6 --dynamic-size 512 1024 --batch 1:4:8 --prompt ""
  cleandift-rt export-onnx ... --precision fp16    # for TensorRT: fp16 with fp32 islands, and OUT.fp32.onnx
  cleandift-rt export-onnx ... --precision int8 --calibration photos/   # CPUs with VNNI / AMX-INT8 (docs/cpu.md)
  cleandift-rt export-onnx ... --aggregator runs/hyper/aggregator.safetensors   # + the 'hyper' output
  cleandift-rt export-onnx ... --encoder taesd-sd21/ --out sd21-fast.onnx   # a fast encoder in place of the VAE's
python export/export_onnx.py takes the same flags."""

BUILD_DESCRIPTION = """\
Build a TensorRT fp16 plan from an exported ONNX feature graph (strongly typed, TensorRT 10.12 to 11.x).

Precision comes from the ONNX graph (TensorRT 11 has no fp16 builder flag): the fp16 export builds
an fp16 plan; --fp16 on an fp32 graph converts it first. The plan is checked per tap against the
fp32 reference before it is written (--no-verify skips that). Needs TensorRT and an NVIDIA GPU;
without them it says which is missing and exits with status 3 (argument and file errors: 2; a plan
that fails verification: 4, kept as OUT.unverified.plan). See docs/engine.md."""

BUILD_EXAMPLES = """\
example:
  cleandift-rt export-onnx --student s.safetensors --base sd21/ --out sd21.onnx --size 768 --precision fp16
  cleandift-rt build-plan --onnx sd21.onnx --out sd21.plan --batch 1:4:8 --timing-cache sd21.cache
python export/build_engine.py takes the same flags."""

UNAVAILABLE, UNVERIFIED = 3, 4  # build-plan's exit statuses beyond 2 (bad arguments or files)


def add_export_onnx_args(p: argparse.ArgumentParser) -> None:
    from ..taps import TAPS

    p.add_argument("--student", required=True, help="student _unet/_full .safetensors file, a diffusers folder, or a "
                   "Robot-DIFT package folder (metadata.json, timestep.bin, unet/)")
    p.add_argument("--base", required=True, help="base model folder (VAE, text encoder) the student was trained from")
    add_output_args(p, "OUT.onnx", "output .onnx path (weights go to OUT.data when > 2 GB)")
    size = p.add_mutually_exclusive_group()
    add_size_arg(size, "fixed input size, multiples of 64 (default: the base model's native size)")
    size.add_argument("--dynamic-size", type=int, nargs=2, metavar=("MIN", "MAX"),
                      help="dynamic H and W within [MIN, MAX] (multiples of 64)")
    p.add_argument("--taps", nargs="+", choices=TAPS, default=None, help="taps to output (default: all 11)")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="batch range recorded for TensorRT profiles (the ONNX batch axis is always dynamic)")
    p.add_argument("--prompt", default="", help='prompt whose embedding is baked in (default "")')
    p.add_argument("--resize", default="stretch", choices=("stretch", "pad"), help="size policy the Engine applies")
    p.add_argument("--external-data", action="store_true", help="always keep weights in OUT.data (default: > 2 GB)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp16: weights and activations in fp16 with fp32 islands (attention scores, norms, "
                   "image-independent paths, tensors measured beyond the fp16 range on the bundled photos), fp32 "
                   "inputs and outputs; the fp32 graph is kept as OUT.fp32.onnx (the reference build-plan "
                   "--verify compares against). Needed for TensorRT's strongly typed fp16 engines. int8: "
                   "accuracy-controlled post-training quantization for CPUs with VNNI / AMX-INT8 (options below; "
                   "the fp32 graph is kept as OUT.fp32.onnx)")
    p.add_argument("--aggregator", metavar="FILE", help="an aggregator.safetensors (cleandift-rt train-aggregator, "
                   "source cleandift or cleandift-heads): the graph also computes its Diffusion Hyperfeatures "
                   "descriptor, output 'hyper' (heads included)")
    p.add_argument("--encoder", metavar="DIR", help="a fast encoder (cleandift-rt distill-encoder) in the graph in "
                   "place of the VAE encoder; check it on your images first: cleandift-rt compare VAE.onnx FAST.onnx "
                   "--images DIR")
    p.add_argument("--allow-pickle", action="store_true",
                   help="Robot-DIFT packages: read pickled .bin U-Net weights (only from a source you trust)")
    p.add_argument("--latent", choices=("mode",), default=None,
                   help="Robot-DIFT 'sample' packages: export with the VAE posterior mode (a graph cannot sample)")
    add_int8_args(p)


def add_int8_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("int8 (--precision int8; pip install 'cleandift-rt[int8]')")
    g.add_argument("--calibration", metavar="DIR", help="images of your domain (searched recursively): "
                   "--validation-size of them are held out for the accuracy check, the next --calibration-size "
                   "calibrate (default: the 3 bundled photos for both, with a warning)")
    g.add_argument("--calibration-size", type=positive_int, default=64, metavar="N",
                   help="images the quantization statistics come from (default 64)")
    g.add_argument("--validation-size", type=positive_int, default=8, metavar="N",
                   help="held-out images the accuracy is measured on (default 8, at most a quarter of DIR)")
    g.add_argument("--max-drop", type=float, default=0.01, metavar="X",
                   help="the worst per-tap cosine to the fp32 graph on the held-out images must be >= 1 - X; "
                   "accuracy control keeps the layers that cost the most in bf16 / fp32 until it is (default 0.01)")
    g.add_argument("--min-agreement", type=float, metavar="A",
                   help="also hold the us6 match agreement with fp32 (the share of held-out pixels whose nearest "
                   "neighbour in the next held-out image is fp32's) at >= A (default: measured and recorded, not "
                   "controlled)")
    g.add_argument("--max-iterations", type=positive_int, metavar="N",
                   help="at most N groups of layers put back in floating point (default: as many as it takes)")


INT8_FLAGS = ("calibration", "calibration_size", "validation_size", "max_drop", "min_agreement", "max_iterations")


def int8_options(args):
    """The ``Int8Options`` of ``--precision int8`` (None otherwise); int8 flags with another precision are refused."""
    from ..export.int8 import Int8Options

    defaults = Int8Options()
    given = [f for f in INT8_FLAGS if getattr(args, f) != getattr(defaults, f)]
    if args.precision != "int8":
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an option of --precision int8")
        return None
    return Int8Options(**{f: getattr(args, f) for f in INT8_FLAGS})


def run_export_onnx(args) -> None:
    """Export from parsed flags; bad arguments and files raise ValueError / OSError before any model loads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, before diffusers is imported
    from pathlib import Path

    from ..export.onnx_export import check_export_args, export_onnx
    from ..models import load_base, load_student_and_base
    from ..models.robot_dift import is_robot_dift_package

    int8 = int8_options(args)
    check_export_args(args.out, args.size, args.dynamic_size, args.taps, args.batch, args.resize, args.precision,
                      aggregator=args.aggregator, encoder=args.encoder)
    if is_robot_dift_package(args.student):  # opened by export_onnx, with its own options
        student, base = args.student, load_base(args.base)
    else:
        student, base = load_student_and_base(Path(args.student), load_base(args.base))
    size = args.size
    if size is None and args.dynamic_size is None:
        size = [base.resolution] * 2  # the base model's native size
    export_onnx(student, base, args.out, size=size, dynamic_size=args.dynamic_size, taps=args.taps, batch=args.batch,
                prompt=args.prompt, resize=args.resize, external_data=True if args.external_data else None,
                precision=args.precision, aggregator=args.aggregator, allow_pickle=args.allow_pickle, latent=args.latent,
                encoder=args.encoder, int8=int8)


def export_onnx_parser() -> argparse.ArgumentParser:
    """The parser of ``python export/export_onnx.py``."""
    p = Parser(prog="export_onnx.py", description=EXPORT_DESCRIPTION.splitlines()[0])
    add_export_onnx_args(p)
    return p


def export_onnx_main(argv=None) -> int:
    """``python export/export_onnx.py``: bad arguments, unreadable inputs, unwritable output: one line, status 2;
    int8 without NNCF: 3; an int8 graph that misses its accuracy target: 4 (kept as OUT.unverified.onnx)."""
    args = export_onnx_parser().parse_args(argv)
    try:
        return export_onnx_status(args, "export_onnx: ")
    except (ValueError, OSError) as exc:
        print(f"export_onnx: {exc}", file=sys.stderr)
        return 2
    return 0


def add_build_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, help="model exported by export-onnx (export/export_onnx.py)")
    add_output_args(p, "OUT.plan", "output .plan path")
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


def build_plan(args, prefix: str) -> int:
    """Build from parsed flags; TensorRT or the GPU missing, or a plan that fails verification, is one line
    starting with ``prefix`` and its own exit status. Other errors (arguments, files) propagate."""
    from ..export.trt_build import BuildUnavailable, build_engine
    from ..export.verify import VerificationFailed

    return with_statuses(lambda: build_engine(args.onnx, args.out, fp16=args.fp16, batch=args.batch,
                                              timing_cache=args.timing_cache, workspace_gb=args.workspace,
                                              verify=args.verify, reference=args.reference,
                                              min_cosine=args.min_cosine),
                         prefix, unavailable=BuildUnavailable, unverified=VerificationFailed)


def with_statuses(work, prefix: str, *, unavailable: type[Exception], unverified: type[Exception]) -> int:
    """Run ``work``: 0, or UNAVAILABLE / UNVERIFIED with one line starting with ``prefix`` when it raises
    ``unavailable`` (a missing tool) or ``unverified`` (a result below its target, kept as unverified)."""
    try:
        work()
    except unavailable as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return UNAVAILABLE
    except unverified as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return UNVERIFIED
    return 0


def build_plan_parser() -> argparse.ArgumentParser:
    """The parser of ``python export/build_engine.py``."""
    p = Parser(prog="build_engine.py", description=BUILD_DESCRIPTION.splitlines()[0])
    add_build_plan_args(p)
    return p


def build_plan_main(argv=None) -> int:
    """``python export/build_engine.py``: statuses 2 (arguments, files), 3 (no TensorRT / GPU), 4 (unverified)."""
    args = build_plan_parser().parse_args(argv)
    try:
        return build_plan(args, "build_engine: ")
    except (ValueError, OSError) as exc:  # bad arguments, unreadable inputs, unwritable output
        print(f"build_engine: {exc}", file=sys.stderr)
        return 2


def export_onnx_status(args, prefix: str) -> int:
    """Export; a missing quantizer or an int8 graph below its target is one line and its own status."""
    from ..export.int8 import Int8TargetMissed

    return with_statuses(lambda: run_export_onnx(args), prefix, unavailable=ImportError, unverified=Int8TargetMissed)


def cmd_export_onnx(args) -> int:
    return export_onnx_status(args, "error: ")


def cmd_build_plan(args) -> int:
    return build_plan(args, "error: ")


def register(sub) -> None:
    """Add the 'export-onnx' and 'build-plan' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("export-onnx", formatter_class=fmt, help="export a student to one ONNX graph (image -> taps)",
                       description=EXPORT_DESCRIPTION + "\n\n" + EXPORT_EXAMPLES)
    add_export_onnx_args(p)
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("build-plan", formatter_class=fmt, help="build a TensorRT plan from an ONNX export (GPU)",
                       description=BUILD_DESCRIPTION + "\n\n" + BUILD_EXAMPLES)
    add_build_plan_args(p)
    p.set_defaults(func=cmd_build_plan)
