"""``cleandift-rt demo``: the whole product path on a fresh machine, no weights and no download.

tiny base model (``models.write_tiny_base``) -> a student U-Net file from it -> ONNX export ->
``Engine`` -> extract all taps -> ``cleandift_rt.match`` -> pictures, on the bundled photos. The cat
is matched against a flipped, rotated and scaled copy of itself, so the true match of every pixel is
known and the demo can say how many matches land near it.

The model is untrained (random weights): the demo proves the pipeline, not the features.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from .common import add_output_args, add_size_arg, square_side

REAL_WEIGHTS = """\
The demo model is UNTRAINED (random weights): these pictures show that export, engine, extraction
and matching work end to end on this machine, not what CleanDIFT features look like. With a trained
model the matches follow the object and the PCA picture separates the cat from the background.

To use real weights (local files only; nothing is downloaded):
  1. a Stable Diffusion 2.1 diffusers folder, e.g. ./stable-diffusion-2-1, and a CleanDIFT student:
     the public release's *_unet.safetensors, or train one:
       python train/train.py --base ./stable-diffusion-2-1 --data captioned_images/ --out run/
  2. export it:
       python export/export_onnx.py --student student_unet.safetensors --base ./stable-diffusion-2-1 \\
           --out sd21.onnx --size 768 768 --taps us6
  3. use it:
       cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out matches.png
       cleandift-rt pca a.jpg b.jpg --engine sd21.onnx --out pca.png
     (or skip the export: --engine student_unet.safetensors --base ./stable-diffusion-2-1)"""


def warped_copy(image, angle_deg: float = 10.0, scale: float = 0.85, flip: bool = True):
    """The image flipped left-right, rotated about its centre and scaled; plus the point map (x, y) -> (x', y')."""
    from PIL import Image

    w, h = image.size
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    a = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    fl = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    m = rot @ fl

    def forward(points):
        return (np.asarray(points, dtype=np.float64) - c) @ m.T + c

    inv = np.linalg.inv(m)
    off = c - inv @ c  # output -> input: p = inv (p' - c) + c
    warped = image.transform((w, h), Image.AFFINE, data=(inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                             resample=Image.BICUBIC, fillcolor=(255, 255, 255))
    return warped, forward


def _within(pred, truth, radius: float) -> float:
    if len(pred) == 0:
        return 0.0
    return float((np.linalg.norm(np.asarray(pred) - np.asarray(truth), axis=1) <= radius).mean() * 100)


def run_demo(out: str | Path, size: int = 256, log=print) -> int:
    import torch

    from ..assets import load_photo
    from ..runtime.engine import Engine
    from ..evaluation.transfer import dense_matches, transfer_points
    from ..models import load_base, save_student_unet, write_tiny_base
    from ..export.onnx_export import export_onnx
    from ..viz.pictures import draw_matches, feature_pca

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    t0 = time.perf_counter()
    log(f"[1/5] building a tiny SD 2.1-topology model in {model_dir} (random weights, no download)")
    base_dir = write_tiny_base(model_dir / "base", seed=0)
    base = load_base(base_dir)
    student_path = model_dir / "student_unet.safetensors"
    save_student_unet(student_path, copy.deepcopy(base.unet), timestep=261.0)  # untrained: a copy of the teacher

    log(f"[2/5] exporting image -> VAE encoder -> student U-Net -> 11 taps to ONNX at {size}x{size}")
    onnx_path = model_dir / "tiny.onnx"
    with warnings.catch_warnings():  # the tracer's notes on constant folding say nothing to a demo user
        warnings.simplefilter("ignore")
        export_onnx(student_path, base, onnx_path, size=(size, size), log=lambda m: log("      " + m))

    log("[3/5] Engine: extracting every tap of the bundled photos")
    engine = Engine(onnx_path)
    cat, coffee, astronaut = (load_photo(n) for n in ("cat", "coffee", "astronaut"))
    warped, forward = warped_copy(cat)
    feats = engine.extract([cat, warped, coffee, astronaut])
    for tap, f in feats.items():
        log(f"      {tap:>4}: {tuple(f.shape)}")
    us6 = {i: torch.as_tensor(feats["us6"][i]).float() for i in range(4)}

    log("[4/5] matching the cat with its flipped, rotated and scaled copy (cleandift_rt.match)")
    tolerance = 0.1 * max(cat.size)
    pa, pb, sim = dense_matches(us6[0], us6[1], cat.size, warped.size, mutual=True)
    dense_ok = _within(pb, forward(pa), tolerance)
    files = {}
    files["matches"] = out / "matches_cat.png"
    draw_matches(cat, warped, pa, pb, sim, title="cat -> flipped, rotated, scaled cat: mutual nearest neighbours, tap us6",
                 note=f"{dense_ok:.0f}% within 0.1 x image size of the truth (UNTRAINED model)").save(files["matches"])
    grid = np.array([[x, y] for y in np.linspace(0.25, 0.75, 4) * cat.height for x in np.linspace(0.2, 0.8, 5) * cat.width])
    pred, ksim = transfer_points(us6[0], us6[1], cat.size, warped.size, grid)
    kp_ok = _within(pred, forward(grid), tolerance)
    files["keypoints"] = out / "keypoints_cat.png"
    draw_matches(cat, warped, grid, pred, ksim, title="keypoint transfer (SPair protocol: upsample, cosine argmax), tap us6",
                 note=f"PCK@0.1 img = {kp_ok:.0f}% (UNTRAINED model)").save(files["keypoints"])

    log("[5/5] feature PCA picture of the three photos")
    files["pca"] = out / "pca.png"
    feature_pca([us6[0], us6[2], us6[3]], [cat, coffee, astronaut],
                title="feature PCA, tap us6 (UNTRAINED model)").save(files["pca"])

    summary = {"model": {"base": str(base_dir), "student": str(student_path), "onnx": str(onnx_path), "size": size,
                         "trained": False},
               "taps": {tap: list(f.shape) for tap, f in feats.items()},
               "cat_vs_warped_cat": {"mutual_matches": int(len(pa)), "mutual_within_0.1_image_percent": dense_ok,
                                     "keypoints": int(len(grid)), "pck_0.1_img_percent": kp_ok},
               "pictures": {k: str(v) for k, v in files.items()}, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(f"wrote {', '.join(str(p) for p in files.values())} and {out / 'demo.json'} "
        f"in {summary['seconds']:.0f} s")
    log(f"cat vs its warped copy: {len(pa)} mutual matches, {dense_ok:.0f}% near the truth; "
        f"keypoint transfer PCK@0.1 img {kp_ok:.0f}%")
    log("")
    log(REAL_WEIGHTS)
    return 0


def cmd_demo(args) -> int:
    return run_demo(args.out, size=square_side(args.size, "demo"))


def register(sub) -> None:
    """Add the 'demo' command to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("demo", formatter_class=fmt, help="end to end on bundled photos with a tiny untrained model",
                       description="Build a tiny model (no download), export it to ONNX, run the Engine, match and "
                       "draw.\n\nexample:\n  cleandift-rt demo --out demo/\n\nThe model is UNTRAINED: the pictures "
                       "show that the pipeline works, not what trained CleanDIFT features look like.")
    add_output_args(p, "DIR", "where the pictures (and the tiny model) go")
    add_size_arg(p, "engine input size in pixels, square, a multiple of 64 (default 256)", default=256)
    p.set_defaults(func=cmd_demo)
