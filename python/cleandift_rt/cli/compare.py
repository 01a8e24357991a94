"""``cleandift-rt compare``: two engines on the same images, per tap (``runtime.compare``).

The check of every precision and every engine file on the user's own images: fp32 against bf16 or
int8, an ``.onnx`` against its plan, a student file against its export, one encoder against
another. Each side is an engine file with its own ``--a-*`` / ``--b-*`` options (backend,
precision, base model); ``--size`` and ``--device`` apply to both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..taps import TAPS
from .common import DEVICE_HELP, UserError, add_size_arg, positive_int, write_json

BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")

DESCRIPTION = """\
Run engines A and B on the same images and compare their features per tap, A being the reference:
cosine between the two engines' whole maps of each image (min and mean over the images), the
largest relative error (max |B - A| / max |A|), and match agreement: the share of pixels whose
nearest neighbour in the next image (cleandift_rt.match) is the same under both engines. Also
each engine's seconds per image (batch 1, after one warm-up image).

Random weights do not show what real weights do: this command on your images is the check of a
precision (bf16, int8), a plan or another encoder before you rely on it.

examples:
  cleandift-rt compare sd21.onnx sd21.int8.onnx --images photos/
  cleandift-rt compare sd21.onnx sd21.onnx --b-precision bf16 --images photos/ --taps us6 --json bf16.json
  cleandift-rt compare sd21.onnx sd21.plan --images photos/ --device cuda
  cleandift-rt compare student_unet.safetensors sd21.onnx --a-base sd21/ --images photos/ --size 768
  cleandift-rt compare sd21.onnx sd21-fast.onnx --images photos/     # the VAE encoder vs a fast encoder
  cleandift-rt compare s.safetensors s.safetensors --base sd21/ --b-encoder taesd-sd21/ --images photos/
"""


def add_side_args(p: argparse.ArgumentParser, side: str) -> None:
    g = p.add_argument_group(f"engine {side.upper()}")
    g.add_argument(f"--{side}-backend", choices=BACKENDS, metavar="NAME",
                   help=f"what runs {side.upper()} ({', '.join(BACKENDS)}; default: chosen from the file)")
    g.add_argument(f"--{side}-precision", choices=PRECISIONS, metavar="P",
                   help=f"precision of {side.upper()} ({', '.join(PRECISIONS)}; default: the file's)")
    g.add_argument(f"--{side}-base", metavar="DIR", help=f"base model of {side.upper()} when it is a student file "
                   "(default: --base)")
    g.add_argument(f"--{side}-encoder", metavar="DIR", help=f"fast encoder (distill-encoder) giving {side.upper()}'s "
                   "latents when it is a student file (default: the base VAE's encoder)")


def side_options(args, side: str) -> dict:
    """``Engine`` keyword arguments of one side."""
    path = getattr(args, side)
    exported = Path(path).suffix in (".onnx", ".plan")
    base = getattr(args, f"{side}_base") or args.base
    options = {"base": None if exported else base, "device": args.device, "backend": getattr(args, f"{side}_backend"),
               "precision": getattr(args, f"{side}_precision"), "size": tuple(args.size) if args.size else None,
               "encoder": getattr(args, f"{side}_encoder")}
    return {k: v for k, v in options.items() if v is not None}


def describe_side(path: str, engine, seconds: float) -> dict:
    info = engine.info
    return {"engine": path, "backend": info.get("backend"), "precision": info.get("precision"),
            "size": list(engine.size), "seconds_per_image": seconds}


def format_report(result: dict) -> str:
    a, b = result["a"], result["b"]
    ratio = a["seconds_per_image"] / b["seconds_per_image"] if b["seconds_per_image"] else float("nan")
    lines = [f"A: {a['engine']}  [{a['backend']} {a['precision']}]  {a['seconds_per_image']:.3f} s/image",
             f"B: {b['engine']}  [{b['backend']} {b['precision']}]  {b['seconds_per_image']:.3f} s/image "
             f"({ratio:.2f}x A's speed)",
             f"{result['images']} images, {result['pairs']} pairs for match agreement",
             f"{'tap':6s} {'cosine min':>11s} {'cosine mean':>12s} {'max rel err':>12s} {'match agree':>12s}"]
    for tap, r in result["taps"].items():
        cells = [_cell(r["cosine_min"], ".6f"), _cell(r["cosine_mean"], ".6f"), _cell(r["max_rel_error"], ".4g"),
                 _cell(r["match_agreement"], ".4f")]
        note = "" if r["shape_a"] == r["shape_b"] else f"  (A {r['shape_a']}, B {r['shape_b']})"
        lines.append(f"{tap:6s} {cells[0]:>11s} {cells[1]:>12s} {cells[2]:>12s} {cells[3]:>12s}{note}")
    worst = result["worst"]
    parts = [f"{key.replace('_', ' ')} {value:.6g} ({tap})" for key, found in worst.items() if found
             for tap, value in [found]]
    if parts:
        lines.append("worst: " + "; ".join(parts))
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cmd_compare(args) -> int:
    from ..extraction.inputs import collect_images
    from ..features.preprocess import load_image
    from ..runtime.compare import common_taps, compare_engines
    from ..runtime.engine import Engine

    items = collect_images(args.images)[: args.max_images]
    if len(items) < 2:
        raise UserError(f"--images gives {len(items)} image; match agreement pairs images: give at least 2")
    engines = {side: Engine(getattr(args, side), **side_options(args, side)) for side in ("a", "b")}
    taps = common_taps(engines["a"].taps, engines["b"].taps, args.taps)  # before any image is read
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="compare", unit="img")
        progress = lambda index, cosines: bar.update(1)  # noqa: E731
    try:
        result = compare_engines(engines["a"], engines["b"], (load_image(item.path) for item in items), taps,
                                 progress=progress)
    finally:
        if progress is not None:
            bar.close()
    seconds = result.pop("seconds_per_image")
    result = {"a": describe_side(args.a, engines["a"], seconds["a"]),
              "b": describe_side(args.b, engines["b"], seconds["b"]),
              "image_names": [item.key for item in items], **result}
    print(format_report(result))
    if args.json:
        write_json(result, Path(args.json))
    return 0


def register(sub) -> None:
    """Add the 'compare' command to the cleandift-rt parser."""
    p = sub.add_parser("compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="two engines (precisions, plans, students, encoders) on the same images, per tap",
                       description=DESCRIPTION)
    p.add_argument("a", metavar="A", help="reference engine: .onnx, .plan, student .safetensors or diffusers folder")
    p.add_argument("b", metavar="B", help="engine compared with A (same kinds of file)")
    p.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILES", help="images (folders searched "
                   "recursively); at least 2, each paired with the next for match agreement")
    p.add_argument("--max-images", type=positive_int, metavar="N", help="use the first N images (sorted by name)")
    p.add_argument("--taps", nargs="+", choices=TAPS, help="taps to compare (default: every tap both engines have)")
    g = p.add_argument_group("both engines")
    g.add_argument("--base", metavar="DIR", help="base model folder for student files (either side)")
    add_size_arg(g, "input size for dynamic-size engines and student files (multiples of 64)")
    g.add_argument("--device", help=DEVICE_HELP)
    add_side_args(p, "a")
    add_side_args(p, "b")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE.json", help="write the comparison (per tap, per engine) as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
