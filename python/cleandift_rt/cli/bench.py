"""``cleandift-rt bench``: a quick timing of an Engine and of ``cleandift_rt.match`` on this machine."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import add_engine_args, open_engine, positive_int


def cmd_bench(args) -> int:
    """Time extraction and matching on this machine (quick look; `bench/` holds the full comparisons)."""
    import torch

    from ..assets import load_photo
    from ..kernels.matching import match

    engine = open_engine(args, taps=[args.tap])
    photos = [load_photo(n) for n in ("cat", "coffee", "astronaut")]
    batch = [photos[i % 3] for i in range(args.batch)]
    engine.extract(batch, taps=[args.tap])  # warm-up: session creation, allocations
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        feats = engine.extract(batch, taps=[args.tap])[args.tap]
        times.append(time.perf_counter() - t0)
    f = torch.as_tensor(np.asarray(feats)).float()
    src, dst = f[:1], f[-1:] if len(f) > 1 else f[:1]
    ours, ref = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        match(src, dst, mutual=True)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a = torch.nn.functional.normalize(src.flatten(2).transpose(1, 2), dim=-1)
        b = torch.nn.functional.normalize(dst.flatten(2).transpose(1, 2), dim=-1)
        s = a @ b.transpose(1, 2)
        s.argmax(-1), s.argmax(-2)
        ref.append(time.perf_counter() - t0)
    best, m_ours, m_ref = min(times), min(ours), min(ref)
    n = f.shape[2] * f.shape[3]
    print(f"engine {args.engine} ({engine.info.get('backend', '?')}), input {engine.size[0]}x{engine.size[1]}, "
          f"tap {args.tap} {tuple(f.shape[1:])}")
    print(f"  extract: batch {args.batch}: best {best * 1000:.1f} ms of {args.repeat} = {args.batch / best:.2f} images/s")
    print(f"  mutual NN match {n}x{n} vectors: cleandift_rt.match {m_ours * 1000:.2f} ms, torch matmul+argmax "
          f"{m_ref * 1000:.2f} ms (x{m_ref / m_ours:.2f})")
    print("  full comparisons against the release extractor, DIFT and faiss: bench/extract.py, bench/match.py")
    return 0


def register(sub) -> None:
    """Add the 'bench' command to the cleandift-rt parser."""
    p = sub.add_parser("bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="time extraction and matching on this machine",
                       description="Quick timing of Engine.extract and cleandift_rt.match on the bundled photos.\n"
                       "The full comparisons (release extractor, DIFT, faiss) are the scripts in bench/.\n\n"
                       "example:\n  cleandift-rt bench --engine sd21.onnx --batch 4")
    add_engine_args(p)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--repeat", type=positive_int, default=3)
    p.set_defaults(func=cmd_bench)
