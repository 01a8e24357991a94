"""Soak: many extractions and matches in one process; does resident memory keep growing?

    python bench/soak.py [--iterations 10000] [--threads 1]

The tiny model's ONNX export (written once to bench/results/models/) runs ``Engine.extract`` on the
bundled photos, ``match`` (mutual) on the features and ``project`` on them, ``--iterations`` times.
RSS is sampled every 5% of the run after a warm-up of 2%; the report gives the growth from the
first sample to the last (the allocator's high-water mark settles during the warm-up) and the
slope, and writes bench/results/soak-*.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_json  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def tiny_export() -> Path:
    import copy

    from cleandift_rt.export.onnx_export import export_onnx
    from cleandift_rt.models import Student, load_base, write_tiny_base

    models = RESULTS / "models"
    path = models / "tiny-128-fp32.onnx"
    if not path.is_file():
        folder = models / "tiny-base"
        if not folder.is_dir():
            write_tiny_base(folder)
        base = load_base(folder)
        export_onnx(Student(unet=copy.deepcopy(base.unet), source=str(folder)), base, path, size=(128, 128))
    return path


def main(argv=None) -> int:
    import torch

    from cleandift_rt import Engine, ProjectionHeads, match, project
    from cleandift_rt.assets import PHOTOS, load_photo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(tiny_export(), taps=["us6", "us9"], threads=args.threads)
    photos = [np.asarray(load_photo(p)) for p in PHOTOS]
    torch.manual_seed(0)
    heads = ProjectionHeads({"us6": 64}).eval()
    warmup = max(1, args.iterations // 50)
    every = max(1, args.iterations // 20)
    samples, t0 = [], time.perf_counter()
    from tqdm.auto import tqdm

    for i in tqdm(range(args.iterations), desc="soak", unit="it"):
        feats = engine.extract([photos[i % 3], photos[(i + 1) % 3]])
        us6 = torch.from_numpy(feats["us6"])
        index, sim = match(us6[:1], us6[1:], mutual=True)
        projected = project(us6, (i * 7) % 1000, heads, "us6")
        if not (torch.isfinite(sim).all() and torch.isfinite(projected).all()):
            raise SystemExit(f"iteration {i}: non-finite output")
        if i >= warmup and (i - warmup) % every == 0:
            samples.append((i, rss_mb()))
    samples.append((args.iterations, rss_mb()))
    seconds = time.perf_counter() - t0
    first, last = samples[0][1], samples[-1][1]
    slope = np.polyfit([s[0] for s in samples], [s[1] for s in samples], 1)[0] * 1000 if len(samples) > 2 else 0.0
    result = {"script": "bench/soak.py", "iterations": args.iterations, "seconds": round(seconds, 1),
              "machine": machine(), "rss_mb": [[i, round(m, 1)] for i, m in samples],
              "rss_first_mb": round(first, 1), "rss_last_mb": round(last, 1),
              "growth_percent": round(100 * (last - first) / first, 2), "slope_mb_per_1000_iterations": round(slope, 3)}
    print(f"{args.iterations} iterations (2 extractions, 1 mutual match, 1 projection each) in {seconds:.0f} s; "
          f"RSS {first:.0f} -> {last:.0f} MB ({result['growth_percent']:+.2f}%), slope {slope:+.2f} MB per 1000 "
          f"iterations; {write_json('soak', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
