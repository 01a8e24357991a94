"""Extraction throughput on one machine: the old per-image loop vs the pipelined local extractor vs
Ray Data (a local Ray), images/s and peak memory of the whole process tree.

Contenders, each in its own subprocess, all over the same image files (photo-sized JPEGs):
  per-image-loop        the `cleandift-rt extract` loop before issue 18, copied here as it was: decode,
                        Engine.extract of one image, one atomic .safetensors write, in turn
  pipelined-safetensors cleandift_rt.extraction.extract_local: decoding threads, batches, a writer
                        thread; one .safetensors per image
  pipelined-shards      the same writing shards
  ray-shards            cleandift_rt.distributed.extract on a local Ray (--ray-cpus CPUs, one engine actor)

Each time runs from opening the engine (Ray: from the call, actors and their engines included) to the
last output committed; Ray's own start (ray.init) is outside it, as a cluster is started once.
Models: the tiny test model at 128 px, and SD2.1-size random weights at 512 px (bench/extract.py's
cache: written once, exported once).

    python bench/extract_throughput.py --quick            # tiny model only (about a minute)
    python bench/extract_throughput.py                    # tiny, then SD2.1 size at 512 px (~15 min on 2 cores)
Writes bench/results/extract_throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, cpu_description, write_json  # noqa: E402

CONTENDERS = ("per-image-loop", "pipelined-safetensors", "pipelined-shards", "ray-shards")
MODELS = {"tiny": 128, "sd21": 512}  # model -> input size
DEFAULT_IMAGES = {"tiny": 96, "sd21": 16}
TARGETS = [  # (model, ours, baseline, minimum ratio of images/s) from issue 18
    ("tiny", "pipelined-safetensors", "per-image-loop", 1.3),
    ("sd21", "ray-shards", "pipelined-shards", 0.85),
]


# -- the baseline: the loop of `cleandift-rt extract` before issue 18, unchanged ----------------


def _write_features(path: Path, feats: dict, fmt: str, meta: dict) -> None:
    import numpy as np

    from cleandift_rt.checkpoint import atomic_write_bytes

    arrays = {t: np.ascontiguousarray(np.asarray(f)) for t, f in feats.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        atomic_write_bytes(path, lambda tmp: save_file(arrays, tmp, metadata={k: str(v) for k, v in meta.items()}))
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write_bytes(path, write)


def per_image_loop(engine, engine_path: str, items: list[tuple[Path, Path]], out_dir: Path, fmt: str = "safetensors"):
    import numpy as np
    from PIL import UnidentifiedImageError

    from cleandift_rt.features.preprocess import load_image

    taps = engine.taps
    suffix = ".safetensors" if fmt == "safetensors" else ".npz"
    failed = []
    for src, rel in items:
        dst = out_dir / rel.with_suffix(suffix)
        try:
            image = load_image(src)
            feats = engine.extract([image], taps=list(taps))
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
            failed.append((src, str(exc).splitlines()[0]))
            continue
        _write_features(dst, {t: np.asarray(f)[0] for t, f in feats.items()}, fmt,
                        {"image": src, "width": image.width, "height": image.height, "engine": engine_path,
                         "taps": ",".join(taps), "input_size": "x".join(map(str, engine.size))})
    return len(items) - len(failed)


# -- peak memory of a process tree ---------------------------------------------------------------


class TreePeak:
    """Peak summed RSS of this process and all its descendants (Ray's workers too), sampled every 50 ms."""

    def __enter__(self):
        import psutil

        self.root, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- one contender, in a worker process ------------------------------------------------------------


def worker(args) -> dict:
    from cleandift_rt.extraction import collect_images, extract_local
    from cleandift_rt.runtime.engine import Engine

    items = collect_images([args.image_dir])
    out = Path(args.out)
    taps = args.taps or None
    result = {"contender": args.worker, "images": len(items)}
    if args.worker == "ray-shards":
        import ray

        from cleandift_rt.distributed import extract

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        with TreePeak() as peak:
            t0 = time.perf_counter()
            summary = extract([i.path for i in items], args.engine, taps=taps, batch_size=args.batch_size,
                              num_gpus_per_worker=0, concurrency=1, output=out, progress=False, log=lambda *_: None)
            seconds = time.perf_counter() - t0
        ray.shutdown()
        result.update(done=summary.done)
    else:
        with TreePeak() as peak:
            t0 = time.perf_counter()
            engine = Engine(args.engine, taps=taps)
            opened = time.perf_counter()
            if args.worker == "per-image-loop":
                done = per_image_loop(engine, args.engine, [(Path(i.path), Path(i.key)) for i in items], out)
            else:
                fmt = args.worker.split("-", 1)[1]
                done = extract_local(engine, items, out, fmt=fmt, batch_size=args.batch_size, progress=False,
                                     log=lambda *_: None).done
            seconds = time.perf_counter() - t0
        result.update(done=done, engine_open_seconds=opened - t0,
                      extract_only_images_per_second=done / (t0 + seconds - opened))
    result.update(seconds=seconds, images_per_second=result["done"] / seconds, peak_tree_mb=peak.peak / 2**20)
    return result


# -- the driver ------------------------------------------------------------------------------------


def make_images(folder: Path, n: int) -> Path:
    """``n`` distinct photo-sized JPEGs (800 x 600, from the bundled photos, rotated and mirrored)."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    from PIL import Image

    from cleandift_rt.assets import PHOTOS, load_photo

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = [load_photo(name).resize((800, 600), Image.BICUBIC) for name in sorted(PHOTOS)]
    for i in range(n):
        img = photos[i % len(photos)].rotate(3 * i, resample=Image.BILINEAR)
        if i % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def ensure_engine(model: str, cache: Path, taps) -> Path:
    from extract import ensure_model, ensure_onnx

    return ensure_onnx(ensure_model(model, cache), cache, MODELS[model], taps)


def run_contender(args, contender: str, engine: Path, images: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="cdrt-bench-") as tmp:
        cmd = [sys.executable, __file__, "--worker", contender, "--engine", str(engine), "--image-dir", str(images),
               "--out", str(Path(tmp) / "out"), "--batch-size", str(args.batch_size), "--ray-cpus", str(args.ray_cpus)]
        if args.taps:
            cmd += ["--taps", *args.taps]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--images", type=int, default=None, help="images per model (default: tiny 96, sd21 16)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--taps", nargs="+", default=["us6"], help="taps to save (default us6; 'all' for every tap)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache", help="random weights and exported models")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.taps == ["all"]:
        args.taps = []
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    models = ["tiny"] if args.quick else args.models
    info = {**cpu_description(), "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()}
    print(f"{info['cpu']}; flags {' '.join(info['cpu_flags'])}; {info['cores']} cores; load {info['load_average'][0]:.1f}")
    rows = []
    for model in models:
        taps = args.taps or None
        engine = ensure_engine(model, args.cache, taps)
        images = make_images(args.cache / f"throughput-images-{args.images or DEFAULT_IMAGES[model]}",
                             args.images or DEFAULT_IMAGES[model])
        for contender in args.contenders:
            row = {"model": model, "size": MODELS[model], **run_contender(args, contender, engine, images)}
            rows.append(row)
            print(f"{model:5s} {contender:22s} {row['images_per_second']:7.2f} img/s  ({row['done']} images in "
                  f"{row['seconds']:.1f} s; peak {row['peak_tree_mb']:.0f} MB)", flush=True)
    rate = {(r["model"], r["contender"]): r["images_per_second"] for r in rows}
    targets = []
    for model, ours, base, minimum in TARGETS:
        if (model, ours) in rate and (model, base) in rate:
            ratio = rate[(model, ours)] / rate[(model, base)]
            targets.append({"model": model, "ours": ours, "baseline": base, "ratio": ratio, "target": minimum,
                            "met": ratio >= minimum})
            print(f"{model}: {ours} / {base} = {ratio:.2f}x (target >= {minimum}x: "
                  f"{'met' if ratio >= minimum else 'NOT met'})")
    for model in models:  # the other ratios, reported without a target
        for ours, base in (("pipelined-shards", "per-image-loop"), ("ray-shards", "pipelined-shards")):
            if (model, ours) in rate and (model, base) in rate and not any(
                    t["model"] == model and t["ours"] == ours and t["baseline"] == base for t in targets):
                print(f"{model}: {ours} / {base} = {rate[(model, ours)] / rate[(model, base)]:.2f}x")
    path = write_json("extract_throughput", {"machine": info, "taps": args.taps or "all", "batch_size": args.batch_size,
                                             "ray_cpus": args.ray_cpus, "rows": rows, "targets": targets})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
