"""``cleandift-rt match`` and ``cleandift-rt pca``: the commands whose product is a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import (UserError, add_engine_args, add_output_args, open_engine, positive_int, read_image, save_picture,
                     tap_maps, write_json)
from .fusion_options import add_recipe_args


def _parse_points(text: str) -> np.ndarray:
    """``"x,y x,y ..."``, or a JSON file holding ``[[x, y], ...]``; either way checked by the one points
    reader (``evaluation.pairs.points_array``: finite numbers, pairs), so a NaN point is named as one."""
    from ..checks import read_json_file
    from ..evaluation.pairs import points_array

    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        return points_array(read_json_file(path, f"--points file {path}"), f"points in {path}")
    try:
        pts = [tuple(float(v) for v in item.split(",")) for item in text.replace(";", " ").split()]
    except ValueError:
        raise UserError(f"--points {text!r}: give 'x,y x,y ...' or a .json file with [[x, y], ...]") from None
    if not pts or any(len(p) != 2 for p in pts):
        raise UserError(f"--points {text!r}: give 'x,y x,y ...' or a .json file with [[x, y], ...]")
    return points_array(pts, f"--points {text!r}")


def _read_pair(args):
    a_path, b_path = Path(args.image_a), Path(args.image_b)
    a, b = read_image(a_path), read_image(b_path)
    pts = _parse_points(args.points) if args.points else None
    if pts is not None:
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < a.width) & (pts[:, 1] >= 0) & (pts[:, 1] < a.height)
        if not inside.all():
            raise UserError(f"points {pts[~inside].tolist()} lie outside image A ({a.width}x{a.height})")
    return a_path, b_path, a, b, pts


def _tap_matches(args, a, b, pts):
    from ..evaluation.transfer import dense_matches, transfer_points

    if args.aggregator:  # the aggregator's learned descriptor instead of one tap
        from .hyper import hyper_source

        source = hyper_source(args)
        fa, fb = (source.features(image, args.category or "") for image in (a, b))
        what, extra = f"hyper ({source.describe().get('source', source.name)})", {"aggregator": args.aggregator}
    else:
        engine = open_engine(args, taps=[args.tap])
        fa, fb = tap_maps(engine, [a, b], args.tap)
        what, extra = f"tap {args.tap}", {"tap": args.tap}
    if pts is not None:
        pb, sim = transfer_points(fa, fb, a.size, b.size, pts)
        return pts, pb, sim, "keypoints (bilinear upsampling to image size, cosine argmax)", what, extra
    pa, pb, sim = dense_matches(fa, fb, a.size, b.size, mutual=True)
    mode = f"mutual nearest neighbours of the {fa.shape[2]}x{fa.shape[1]} and {fb.shape[2]}x{fb.shape[1]} feature grids"
    return pa, pb, sim, mode, what, extra


def _recipe_matches(args, a, b, pts):
    """Matches by a fusion recipe; with a mirrored source (adaptive flip) ``a`` is returned mirrored."""
    from ..fusion.pipeline import Fusion, prompt_embedder
    from .fusion_options import check_recipe_args, open_dino, recipe_from_args, resolve_prompt

    check_recipe_args(args, [args.recipe])
    engine = open_engine(args)
    recipe = recipe_from_args(args.recipe, args)
    text_model = getattr(getattr(engine.backend, "ref", None), "base", None)
    if args.category and text_model is None and args.base:
        from ..models import load_base

        text_model = load_base(args.base)
    prompt = resolve_prompt(args, fused=True) if args.category else ""
    fusion = Fusion(recipe, engine, open_dino(args), prompt_embedder(prompt, text_model))
    extra = {"recipe": fusion.describe(), "category": args.category}
    if pts is not None:
        transfer = fusion.transfer(a, b, pts, category=args.category)
        mode = "keypoints (the cell under each point, cosine argmax over the descriptor grid" + \
            (", 11 x 11 window soft-argmax)" if recipe.refine else ")")
        if recipe.flip:
            mode += "; no adaptive flip for --points (it needs SPair keypoint ids)"
        return pts, transfer.points, transfer.similarity, mode, recipe.label(), extra
    pa, pb, sim, flipped = fusion.dense(a, b, args.category)
    mode = f"mutual nearest neighbours of the {fusion.grid}x{fusion.grid} fused descriptor grids"
    if flipped:
        mode += "; image A mirrored: its mirror fits B better (adaptive flip)"
    extra["flipped"] = flipped
    return pa, pb, sim, mode, recipe.label(), extra


def cmd_match(args) -> int:
    from ..viz.pictures import draw_matches

    a_path, b_path, a, b, pts = _read_pair(args)
    if not args.engine and not args.aggregator:
        raise UserError("pass --engine FILE (or --aggregator FILE with --base DIR for an inversion aggregator)")
    if args.aggregator and args.recipe != "nn":
        raise UserError("--aggregator matches the aggregator's own descriptors: drop --recipe")
    if args.recipe == "nn":
        pa, pb, sim, mode, what, extra = _tap_matches(args, a, b, pts)
    else:
        pa, pb, sim, mode, what, extra = _recipe_matches(args, a, b, pts)
        if extra.get("flipped"):
            from PIL import Image

            a = a.transpose(Image.FLIP_LEFT_RIGHT)  # the matches start in the mirrored image
    order = np.argsort(-sim, kind="stable")
    title = f"{a_path.name} -> {b_path.name}: {what}, {mode.split(' (')[0]}"
    picture = draw_matches(a, b, pa, pb, sim, max_lines=args.max_lines, title=title)
    save_picture(picture, Path(args.out))
    print(f"{len(pa)} matches ({mode}); picture: {args.out}")
    if args.json:
        write_json({"image_a": str(a_path), "image_b": str(b_path), "size_a": list(a.size), "size_b": list(b.size),
                    "engine": str(args.engine), **extra, "mode": mode,
                    "matches": [{"a": [round(float(v), 2) for v in pa[i]], "b": [round(float(v), 2) for v in pb[i]],
                                 "similarity": round(float(sim[i]), 6)} for i in order]}, Path(args.json))
        print(f"matches as JSON (most confident first): {args.json}")
    return 0


def cmd_pca(args) -> int:
    from ..viz.pictures import feature_pca

    paths = [Path(p) for p in args.images]
    images = [read_image(p) for p in paths]
    engine = open_engine(args, taps=[args.tap])
    feats = tap_maps(engine, images, args.tap)
    title = f"feature PCA, tap {args.tap}: " + ", ".join(p.name for p in paths)
    save_picture(feature_pca(feats, images, height=args.height, title=title), Path(args.out))
    print(f"PCA picture of {len(images)} image(s), tap {args.tap} ({feats[0].shape[0]} channels): {args.out}")
    return 0


def register(sub) -> None:
    """Add the 'match', 'pca' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("match", formatter_class=fmt, help="match two images; picture + JSON",
                       description="Match image A to image B with one tap's features.\n\n"
                       "Without --points: mutual nearest neighbours between the two feature grids (dense).\n"
                       "With --points: each point of A goes to the pixel of B with the most similar feature\n"
                       "(features upsampled to the image sizes, as in the SPair protocol).\n\nexamples:\n"
                       "  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out matches.png --json matches.json\n"
                       "  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out kp.png --points '120,80 200,95'\n"
                       "  cleandift-rt match a.jpg b.jpg --engine student_unet.safetensors --base sd21/ --size 512 512 "
                       "--recipe tlfr --dino dinov2-base/ --out m.png   (CleanDIFT + DINOv2, docs/fusion.md)")
    p.add_argument("image_a")
    p.add_argument("image_b")
    add_engine_args(p, engine_required=False)
    g = add_output_args(p, "matches.png", "side-by-side picture")
    g.add_argument("--json", metavar="FILE", help="also write the matches as JSON, most confident first")
    p.add_argument("--points", metavar="'x,y x,y'|FILE.json", help="source keypoints instead of dense matching")
    p.add_argument("--max-lines", type=positive_int, default=60, help="lines drawn, most confident first (default 60)")
    add_recipe_args(p, several=False)
    p.add_argument("--aggregator", metavar="FILE", help="match with a Diffusion Hyperfeatures aggregator's 'hyper' "
                   "descriptors instead of --tap (docs/hyperfeatures.md)")
    p.add_argument("--category", help="object category: the recipes' prompt 'A photo of a {category}' (needs --base; "
                   "default: the engine's baked prompt)")
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("pca", formatter_class=fmt, help="feature PCA picture",
                       description="One PCA over the features of all images: component 1 thresholded separates "
                       "foreground from background; components 2-4 are shown as RGB.\n\nexample:\n"
                       "  cleandift-rt pca cat.jpg dog.jpg --engine sd21.onnx --out pca.png")
    p.add_argument("images", nargs="+")
    add_engine_args(p)
    add_output_args(p, "pca.png", "the PCA picture")
    p.add_argument("--height", type=positive_int, default=256, help="picture height per row in pixels (default 256)")
    p.set_defaults(func=cmd_pca)
