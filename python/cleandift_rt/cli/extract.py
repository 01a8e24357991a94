"""``cleandift-rt extract``: features of many images to files, on this machine or on a Ray cluster."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import check_output_file
from ..extraction.inputs import FORMATS, collect_images
from ..extraction.pipeline import extract_local
from ..taps import TAPS
from .common import (UserError, add_engine_args, add_output_args, add_run_args, engine_options, open_engine,
                     positive_int, write_json)

LISTED_FAILURES = 20

DESCRIPTION = """\
Write the features of many images: one file per image (--format safetensors or npz, named after the
image: a.jpg -> a.jpg.safetensors) or shards of many images (--format shards: safetensors files
that `cleandift_rt.read_shards(DIR)` or plain safetensors reads back; docs/scale.md). Decoding,
inference in batches (--batch-size) and writing overlap. A manifest in DIR records what is done:
rerun the same command after an interruption and it resumes, after checking what it would skip
(an image edited since, an output deleted or cut short is extracted again, and said so);
unreadable images are listed and skipped. --ray runs the same pipeline on Ray Data (a local Ray, or a cluster: --ray auto).

examples:
  cleandift-rt extract photos/ --engine sd21.onnx --out feats/ --taps us6
  cleandift-rt extract photos/ --engine sd21.onnx --out shards/ --format shards --batch-size 8
  cleandift-rt extract /shared/photos --engine /shared/sd21.plan --out /shared/feats --format shards \\
      --ray auto --concurrency 8 --gpus-per-worker 1
"""


def _run_on_ray(args, items):
    if args.format != "shards":
        raise UserError(f"--ray writes shards only (many workers, one folder): add --format shards (not "
                        f"--format {args.format})")
    try:
        from ..distributed.pipeline import run_items
    except ImportError as exc:
        raise UserError(f"--ray needs Ray Data ({exc}): pip install 'cleandift-rt[distributed]' "
                        "(or pip install 'ray[data]')") from None
    return run_items(items, args.engine, taps=args.taps, batch_size=args.batch_size,
                     num_gpus_per_worker=args.gpus_per_worker, concurrency=args.concurrency, output=args.out,
                     address=None if args.ray == "local" else args.ray, engine_options=engine_options(args),
                     shard_images=args.shard_images, progress=not args.no_progress)


def cmd_extract(args) -> int:
    check_output_file(args.summary, "--summary")  # before the work, not after it
    items = collect_images(args.inputs)
    if args.ray is not None:
        summary = _run_on_ray(args, items)
    else:
        if args.gpus_per_worker is not None or args.concurrency is not None:
            raise UserError("--concurrency and --gpus-per-worker size the Ray workers: add --ray (this machine: "
                            "--device and --batch-size)")
        engine = open_engine(args, taps=args.taps)
        summary = extract_local(engine, items, args.out, fmt=args.format, batch_size=args.batch_size,
                                shard_images=args.shard_images, workers=args.workers, progress=not args.no_progress)
    rate = f" ({summary.done / summary.seconds:.2f} img/s)" if summary.done and summary.seconds else ""
    what = "image(s) into shards" if args.format == "shards" else "feature file(s)"
    print(f"wrote {summary.done} {what} to {args.out}{rate}"
          + (f", {len(summary.redone)} of them again (input changed or output damaged: see above)"
             if summary.redone else ""))
    if summary.failed:
        print(f"skipped {len(summary.failed)} unreadable image(s):")
        for path, why in summary.failed[:LISTED_FAILURES]:
            print(f"  {path}: {why}")
        if len(summary.failed) > LISTED_FAILURES:
            print(f"  ... and {len(summary.failed) - LISTED_FAILURES} more (all in {args.out}/manifest-"
                  f"{args.format}.jsonl)")
    if args.summary:
        write_json(summary.to_dict(), Path(args.summary))
    return 1 if summary.failed and summary.done == 0 and summary.skipped == 0 else 0


def register(sub) -> None:
    """Add the 'extract' command to the cleandift-rt parser."""
    p = sub.add_parser("extract", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="features of many images to files or shards (resumable; --ray for clusters)",
                       description=DESCRIPTION)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR")
    add_engine_args(p, tap=None)
    g = add_output_args(p, "DIR", "where the feature files (or shards) and the manifest go")
    g.add_argument("--taps", nargs="+", choices=TAPS, help="taps to save (default: all of the engine's)")
    g.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors / npz: one file per image; shards: many images per file (default safetensors)")
    g.add_argument("--shard-images", type=positive_int, metavar="N",
                   help="images per shard (default: 4096, fewer when that would exceed ~1 GiB of features)")
    g.add_argument("--summary", metavar="FILE.json", help="also write the run's summary as JSON")
    g = add_run_args(p)
    g.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="images per engine call (default: a TensorRT plan's optimal batch, else 4)")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="decoding threads on this machine (default: up to 4, one per usable core)")
    g = p.add_argument_group("Ray Data (pip install 'cleandift-rt[distributed]')")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a Ray started on this machine (or the cluster RAY_ADDRESS names); "
                   "'auto' or ray://HOST:10001 joins a running cluster (docs/scale.md)")
    g.add_argument("--concurrency", type=positive_int, metavar="N",
                   help="engine workers (actors), each holding one Engine (default: one per GPU, or 1 on CPUs)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per engine worker (default 1 where the cluster has GPUs, else 0)")
    p.set_defaults(func=cmd_extract)
