"""``cleandift-rt explore``: the correspondence explorer, a local web page (``cleandift_rt.explore``).

This module opens what the page works with (the Engine, the projection heads, DINOv2 and the fusion
recipes) and hands it to the explorer's session; the page does the rest (docs/explore.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, add_engine_args, open_engine
from .fusion_options import add_recipe_args, check_recipe_args, open_dino, recipe_from_args

DEFAULT_PORT = 7860  # Gradio's: where people who ran such demos look first
STUDENT_TIMESTEP = 261.0  # the projected recipe's first t when the engine records none (CleanDIFT's student)


def _split_images(items) -> tuple[list[Path], list[Path]]:
    """``--images``: files load at start; a folder's images are offered on the page to pick from."""
    from ..explore.session import folder_images

    files, library = [], []
    for item in items or ():
        path = Path(item)
        if path.is_dir():
            found = folder_images(path)
            if not found:
                raise UserError(f"--images {path}: the folder holds no images (.jpg, .png, .webp, .bmp, .tif)")
            library += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--images {path}: no such file or folder")
    return files, library


def _session(args, library):
    """The session: the engine (with the aggregator), the heads, DINOv2 and the fusion recipes it offers."""
    from ..explore import ExploreError, Session

    engine = open_engine(args, aggregator=args.aggregator)
    heads = None
    if args.heads:
        from ..models.heads import ProjectionHeads

        heads = ProjectionHeads.from_release(args.heads)
    fusions = {}
    if args.dino or args.no_dino:
        from ..fusion.pipeline import Fusion

        dino = open_dino(args)
        fusions = {name: Fusion(recipe_from_args(name, args), engine, dino) for name in ("tale", "tlfr")}
    timestep = engine.info.get("timestep")
    start = {"kind": "tap", "tap": args.tap} if args.recipe == "nn" else {"kind": "fusion", "name": args.recipe}
    try:
        return Session(engine, heads=heads, timestep=STUDENT_TIMESTEP if timestep is None else timestep,
                       fusions=fusions, library=library, start=start)
    except ExploreError as exc:
        raise UserError(f"--tap / --recipe: {exc}") from None


def _sequence(path, engine, lock):
    """The tracking tab's sequence: a video file or a folder of frames, its first MAX_FRAMES frames."""
    from itertools import islice

    from ..explore.tracking import MAX_FRAMES, TrackingSession, shrink
    from ..tracking import Tracker
    from ..tracking.video import open_frames

    frames, fps, count = open_frames(path)
    kept = [shrink(f) for f in islice(frames, MAX_FRAMES)]
    return TrackingSession(kept, fps, Path(path).name, lambda tap: Tracker(engine, tap=tap), lock, total=count)


def cmd_explore(args) -> int:
    from ..explore import ExploreError, ExplorerServer

    files, library = _split_images(args.images)
    if args.recipe != "nn" and not (args.dino or args.no_dino):
        raise UserError(f"--recipe {args.recipe} fuses DINOv2 features: pass --dino PATH (or --no-dino)")
    if args.dino or args.no_dino:
        check_recipe_args(args, ["tale", "tlfr"])
    try:  # the port first: a taken one fails before a large engine loads
        server = ExplorerServer(None, args.host, args.port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pick another --port "
                        "(0 takes a free one)") from None
    try:
        server.session = _session(args, library)
        for path in files:
            try:
                server.session.add_file(path)
            except ExploreError as exc:
                raise UserError(f"--images: {exc}") from None
        if args.video:
            try:
                server.tracking = _sequence(args.video, server.session.engine, server.session.lock)
            except ExploreError as exc:
                raise UserError(f"--video: {exc}") from None
        if server.allowed_hosts() is None:
            print(f"warning: listening on {args.host}, not loopback: anyone who can reach it can use the explorer "
                  "(there is no password)")
        print(f"explorer: {server.url}  ({len(files)} image(s) loaded; Ctrl+C stops it)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("explorer stopped")
    finally:
        server.server_close()
    return 0


def register(sub) -> None:
    """Add the 'explore' command to the cleandift-rt parser."""
    p = sub.add_parser("explore", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="interactive correspondence explorer in the browser",
                       description="A local web page: load two or more images, click a point on one and see, on "
                       "every other image, the cosine-similarity heat map and the best match (soft-argmax refined) "
                       "with its similarity; switch taps and recipes; see each image's feature PCA. Features are "
                       "computed once per image; a click runs only the matching. Listens on loopback only unless "
                       "--host says otherwise (docs/explore.md).\n\nexamples:\n"
                       "  cleandift-rt explore --engine sd21.onnx --images cat.jpg dog.jpg photos/\n"
                       "  cleandift-rt explore --engine sd21.onnx --heads student_full.safetensors "
                       "--aggregator runs/hyper/aggregator.safetensors --video clip.mp4\n"
                       "  cleandift-rt explore --engine student_unet.safetensors --base sd21/ --size 512 "
                       "--dino dinov2-base/ --recipe tlfr")
    add_engine_args(p, tap_why="the tap the page starts with; it offers every tap of the engine")
    g = p.add_argument_group("explorer")
    g.add_argument("--images", nargs="+", metavar="PATH", help="images to load at start; a folder's images are "
                   "listed on the page to pick from")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    g.add_argument("--video", metavar="PATH", help="a video file or a folder of frames for the tracking tab (the first "
                   "150 frames; OpenCV reads them)")
    g.add_argument("--heads", metavar="FULL_FILE", help="a '_full' student file: offers the tap projected by its "
                   "heads at a timestep you choose")
    g.add_argument("--aggregator", metavar="FILE", help="a Diffusion Hyperfeatures aggregator "
                   "(cleandift-rt train-aggregator): offers its 'hyper' descriptor")
    add_recipe_args(p, several=False)
    p.set_defaults(func=cmd_explore)
