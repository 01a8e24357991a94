"""``cleandift-rt match`` and ``cleandift-rt pca``: the commands whose product is a picture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..cli.common import UserError, add_engine_args, open_engine, positive_int, read_image, save_picture, tap_maps, write_json


def _parse_points(text: str) -> np.ndarray:
    """``"x,y x,y ..."``, or a JSON file holding ``[[x, y], ...]``."""
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        from ..evaluation.pairs import points_array

        return points_array(json.loads(path.read_text()), f"points in {path}")
    try:
        pts = [tuple(float(v) for v in item.split(",")) for item in text.replace(";", " ").split()]
    except ValueError:
        raise UserError(f"--points {text!r}: give 'x,y x,y ...' or a .json file with [[x, y], ...]") from None
    if not pts or any(len(p) != 2 for p in pts):
        raise UserError(f"--points {text!r}: give 'x,y x,y ...' or a .json file with [[x, y], ...]")
    return np.array(pts, dtype=np.float64)


def cmd_match(args) -> int:
    from ..evaluation.transfer import dense_matches, transfer_points
    from ..viz.pictures import draw_matches

    a_path, b_path = Path(args.image_a), Path(args.image_b)
    a, b = read_image(a_path), read_image(b_path)
    pts = _parse_points(args.points) if args.points else None
    if pts is not None:
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < a.width) & (pts[:, 1] >= 0) & (pts[:, 1] < a.height)
        if not inside.all():
            raise UserError(f"points {pts[~inside].tolist()} lie outside image A ({a.width}x{a.height})")
    engine = open_engine(args, taps=[args.tap])
    fa, fb = tap_maps(engine, [a, b], args.tap)
    if pts is not None:
        pb, sim = transfer_points(fa, fb, a.size, b.size, pts)
        pa, mode = pts, "keypoints (bilinear upsampling to image size, cosine argmax)"
    else:
        pa, pb, sim = dense_matches(fa, fb, a.size, b.size, mutual=True)
        mode = f"mutual nearest neighbours of the {fa.shape[2]}x{fa.shape[1]} and {fb.shape[2]}x{fb.shape[1]} feature grids"
    order = np.argsort(-sim, kind="stable")
    title = f"{a_path.name} -> {b_path.name}: tap {args.tap}, {mode.split(' (')[0]}"
    picture = draw_matches(a, b, pa, pb, sim, max_lines=args.max_lines, title=title)
    save_picture(picture, Path(args.out))
    print(f"{len(pa)} matches ({mode}); picture: {args.out}")
    if args.json:
        write_json({"image_a": str(a_path), "image_b": str(b_path), "size_a": list(a.size), "size_b": list(b.size),
                     "engine": str(args.engine), "tap": args.tap, "mode": mode,
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
                       "  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out kp.png --points '120,80 200,95'")
    p.add_argument("image_a")
    p.add_argument("image_b")
    add_engine_args(p)
    p.add_argument("--out", required=True, metavar="matches.png", help="side-by-side picture")
    p.add_argument("--json", metavar="FILE", help="also write the matches as JSON, most confident first")
    p.add_argument("--points", metavar="'x,y x,y'|FILE.json", help="source keypoints instead of dense matching")
    p.add_argument("--max-lines", type=positive_int, default=60, help="lines drawn, most confident first (default 60)")
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("pca", formatter_class=fmt, help="feature PCA picture",
                       description="One PCA over the features of all images: component 1 thresholded separates "
                       "foreground from background; components 2-4 are shown as RGB.\n\nexample:\n"
                       "  cleandift-rt pca cat.jpg dog.jpg --engine sd21.onnx --out pca.png")
    p.add_argument("images", nargs="+")
    add_engine_args(p)
    p.add_argument("--out", required=True, metavar="pca.png")
    p.add_argument("--height", type=positive_int, default=256, help="picture height per row in pixels (default 256)")
    p.set_defaults(func=cmd_pca)
