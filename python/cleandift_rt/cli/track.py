"""``cleandift-rt track | eval-tracking``: follow points through a video, and score the tracker on TAP-Vid
or on synthetic videos made from a photo folder (``tracking``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import (UserError, add_engine_args, add_output_args, add_run_args, engine_options, positive_int,
                     save_picture, write_json)

TRACK_EXAMPLE = """examples:
  cleandift-rt track clip.mp4 --engine sd21.onnx --points "120,80 200,150" --out tracks.mp4
  cleandift-rt track frames/ --engine robot-dift-encoder/ --base sd2-1-base/ --prompt "insert the pin" \\
      --points "64,64 128,100" --out tracks.mp4 --json tracks.json
Points are (x, y) pixels of the reference frame (--reference-frame, default the first). The video shows
each point's trail and a dot: filled green where visible, a red ring where not; the JSON holds every
frame's points, cosine scores and visibility."""

EVAL_EXAMPLE = """examples:
  cleandift-rt eval-tracking --synthetic photos/ --engine sd21.onnx --out track-eval/
  cleandift-rt eval-tracking --tapvid tapvid_davis.pkl --allow-pickle --engine sd21.onnx --out davis/
TAP-Vid's metrics in "query first" mode at 256 x 256: average Jaccard (AJ), <δavg (points within 1, 2,
4, 8, 16 px, averaged) and occlusion accuracy (OA), per video and overall (mean over videos), in
OUT/results.json, with a chart and the first video's tracks in OUT/results.png."""


def parse_points(text: str) -> np.ndarray:
    """``"x,y x,y ..."`` -> float32 ``[N, 2]``."""
    try:
        pts = [[float(v) for v in pair.split(",")] for pair in text.replace(";", " ").split()]
    except ValueError:
        raise UserError(f"--points {text!r}: expected 'x,y x,y ...' pixel pairs, e.g. --points \"120,80 200,150\"") from None
    if not pts or any(len(p) != 2 for p in pts):
        raise UserError(f"--points {text!r}: expected 'x,y x,y ...' pixel pairs, e.g. --points \"120,80 200,150\"")
    return np.asarray(pts, dtype=np.float32)


def add_tracker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tracker")
    g.add_argument("--taps", nargs="+", default=None, metavar="TAP",
                   help="taps to match on (several: each unit length, concatenated); default us6, else the engine's first")
    g.add_argument("--no-refine", action="store_true", help="cell centres instead of the window soft-argmax")
    g.add_argument("--radius", type=float, default=None,
                   help="forward-backward radius in reference pixels for a point to count as visible (default: one "
                   "feature cell)")
    g.add_argument("--min-score", type=float, default=None, help="cosine floor of a visible point (default 0.5)")
    g.add_argument("--keyframe-every", type=int, default=0, help="add a keyframe reference every N frames (0 = off)")
    g.add_argument("--prompt", default=None,
                   help="instruction for text-conditioned engines (Robot-DIFT packages; for .onnx/.plan also --base, "
                   "whose text encoder encodes it)")
    g.add_argument("--latent", choices=["mode", "sample"], default=None,
                   help="Robot-DIFT 'sample' packages: draw the VAE posterior (with --seed) or use its mode")
    g.add_argument("--latent-seed", type=int, default=None, help="seed of --latent sample")
    g.add_argument("--allow-pickle", action="store_true",
                   help="read pickles you trust: TAP-Vid files, .bin weights of Robot-DIFT packages")


def make_tracker(args):
    """The Engine (with the package and prompt options that apply to it) and the Tracker on it."""
    from ..models import load_base
    from ..models.robot_dift import is_robot_dift_package
    from ..runtime.engine import Engine
    from ..tracking import Tracker
    from ..tracking.tracker import DEFAULT_MIN_SCORE

    options = engine_options(args)
    text = {}
    if is_robot_dift_package(args.engine):
        options.update(allow_pickle=args.allow_pickle, latent=args.latent, seed=args.latent_seed)
        if args.prompt is not None:
            text["prompt"] = args.prompt
    elif args.latent is not None or args.latent_seed is not None:
        raise UserError("--latent / --latent-seed apply to Robot-DIFT package folders (with metadata.json)")
    elif args.prompt is not None and Path(args.engine).suffix in (".onnx", ".plan"):
        if not args.base:
            raise UserError(f"--prompt with {Path(args.engine).name}: pass --base DIR, the base model whose text "
                            "encoder turns the instruction into the graph's prompt_embeds input")
        text["prompt_embeds"] = load_base(args.base).encode_prompt(args.prompt)[0]
    elif args.prompt is not None:
        options["prompt"] = args.prompt
    engine = Engine(args.engine, **options)
    tracker = Tracker(engine, args.taps, refine=not args.no_refine, radius=args.radius,
                      min_score=DEFAULT_MIN_SCORE if args.min_score is None else args.min_score,
                      keyframe_every=args.keyframe_every, **text)
    return engine, tracker


def tracker_config(engine, tracker) -> dict:
    info = engine.info
    return {"engine": str(engine.path), "backend": info.get("backend"), "precision": info.get("precision"),
            "size": list(engine.size), "taps": list(tracker.taps), "refine": tracker.refine, "radius": tracker.radius,
            "min_score": tracker.min_score, "keyframe_every": tracker.keyframe_every,
            **({"robot_dift": info["extra"]["robot_dift"]} if "robot_dift" in info.get("extra", {}) else {})}


def cmd_track(args) -> int:
    from tqdm import tqdm

    from ..tracking.video import VideoWriter, draw_tracks, open_frames

    points = parse_points(args.points)
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    frames, fps, count = open_frames(args.source)
    engine, tracker = make_tracker(args)
    history, records, extract_s, match_s = [], [], [], []
    with VideoWriter(out, fps) as writer:
        bar = tqdm(frames, total=count, desc="track", unit="frame", disable=args.no_progress)
        for index, frame in enumerate(bar):
            if index < args.reference_frame:
                continue
            if args.max_frames and len(records) >= args.max_frames:
                break
            if index == args.reference_frame:
                tracker.set_reference(frame, points)
                result_points, score, visible = points, np.ones(len(points), np.float32), np.ones(len(points), bool)
            else:
                result = tracker.track(frame)
                result_points, score, visible = result.points, result.score, result.visible
                extract_s.append(tracker.timing["extract"])
                match_s.append(tracker.timing["match"])
            history.append(result_points)
            writer.write(draw_tracks(frame, history, visible))
            records.append({"index": index, "points": np.round(result_points, 2).tolist(),
                            "score": np.round(score, 4).tolist(), "visible": visible.tolist()})
    if not records:
        raise UserError(f"{args.source} has no frame {args.reference_frame} (--reference-frame)")
    timing = {"tracked_frames": len(extract_s),
              "engine_ms_per_frame": 1000 * float(np.mean(extract_s)) if extract_s else None,
              "tracker_ms_per_frame": 1000 * float(np.mean(match_s)) if match_s else None}
    write_json({"source": str(args.source), "fps": fps, "reference_frame": args.reference_frame,
                "query_points": points.tolist(), **tracker_config(engine, tracker), "timing": timing,
                "frames": records}, json_path)
    visible_share = np.mean([np.mean(r["visible"]) for r in records[1:]]) if len(records) > 1 else 1.0
    print(f"tracked {len(points)} points through {len(records)} frames ({100 * visible_share:.0f}% visible on "
          f"average); wrote {out} and {json_path}")
    if extract_s:
        print(f"  per frame: engine {timing['engine_ms_per_frame']:.1f} ms, tracker {timing['tracker_ms_per_frame']:.1f} ms")
    return 0


def cmd_eval_tracking(args) -> int:
    from ..tracking import evaluate, load_tapvid, synthetic_videos
    from ..tracking.evaluate import summary_lines
    from ..tracking.synthetic import photo_files
    from ..tracking.tapvid import tapvid_files
    from ..tracking.video import results_picture

    out = Path(args.out)
    if args.tapvid:
        tapvid_files(args.tapvid)  # missing files fail before the engine loads
        videos, total = load_tapvid(args.tapvid, allow_pickle=args.allow_pickle), None
        source = {"tapvid": str(args.tapvid)}
    else:
        photos = photo_files(args.synthetic)[:args.max_videos]
        videos = synthetic_videos(args.synthetic, args.motions, frames=args.frames, points=args.points, seed=args.seed,
                                  max_photos=args.max_videos)
        total = len(photos) * len(args.motions)
        source = {"synthetic": str(args.synthetic), "motions": args.motions, "frames": args.frames,
                  "points": args.points, "seed": args.seed}
    if args.max_videos and args.tapvid:
        videos = (v for i, v in zip(range(args.max_videos), videos))
        total = args.max_videos
    engine, tracker = make_tracker(args)
    t0 = time.perf_counter()
    results = evaluate(tracker, videos, total=total, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    save_picture(results_picture(results), out / "results.png")
    payload = {"mode": "query first", "size": 256, "metrics": "TAP-Vid: occlusion_accuracy, pts_within_d, jaccard_d "
               "(d = 1, 2, 4, 8, 16 px), average_pts_within_thresh (<δavg), average_jaccard", **source,
               "config": tracker_config(engine, tracker), "seconds": time.perf_counter() - t0,
               **{k: results[k] for k in ("overall", "per_video", "timing")}}
    write_json(payload, out / "results.json")
    print("\n".join(summary_lines(results)))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}")
    return 0


def register(sub) -> None:
    """Add the 'track' and 'eval-tracking' commands to the cleandift-rt parser."""
    from ..tracking.synthetic import MOTIONS

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("track", formatter_class=fmt, help="follow points through a video or a folder of frames",
                       description="Track points by dense-descriptor matching (cleandift_rt.Tracker): each frame's "
                       "features are searched for the reference points, visibility from a forward-backward check.\n\n"
                       + TRACK_EXAMPLE)
    p.add_argument("source", help="a video file (anything OpenCV reads) or a folder of frames (sorted by name)")
    p.add_argument("--points", required=True, help='points to follow: "x,y x,y ..." in reference-frame pixels')
    p.add_argument("--reference-frame", type=int, default=0, help="index of the frame the points are on (default 0)")
    p.add_argument("--max-frames", type=positive_int, default=None, help="stop after this many frames")
    add_engine_args(p, tap=None)
    add_tracker_args(p)
    g = add_output_args(p, "VIDEO", "the tracks drawn on the frames (.mp4 or .avi)")
    g.add_argument("--json", metavar="FILE", help="the tracks as JSON (default: OUT with .json)")
    add_run_args(p)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("eval-tracking", formatter_class=fmt, help="TAP-Vid metrics of the tracker (TAP-Vid or synthetic)",
                       description="Score the tracker with TAP-Vid's metrics on TAP-Vid pickles or on videos made "
                       "from a photo folder by known motions (translation, rotation, scale, perspective; points leave "
                       "the frame), so it runs with no dataset.\n\n" + EVAL_EXAMPLE)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--tapvid", metavar="PKL", help="a TAP-Vid pickle, or a folder of them (needs --allow-pickle)")
    data.add_argument("--synthetic", metavar="DIR", help="a folder of photos to make videos from")
    p.add_argument("--motions", nargs="+", choices=MOTIONS, default=list(MOTIONS), help="synthetic motions")
    p.add_argument("--frames", type=positive_int, default=24, help="frames per synthetic video (default 24)")
    p.add_argument("--points", type=positive_int, default=64, help="query points per synthetic video (default 64)")
    p.add_argument("--max-videos", type=positive_int, default=None,
                   help="TAP-Vid: the first N videos; synthetic: the first N photos")
    add_engine_args(p, tap=None)
    add_tracker_args(p)
    add_output_args(p, "DIR", "folder for results.json and results.png")
    add_run_args(p, seed="seed of the synthetic query points")
    p.set_defaults(func=cmd_eval_tracking)
