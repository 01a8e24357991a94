"""``cleandift-rt info | build-info | bench``: the commands that describe an Engine or time one (``extract``
lives in ``extraction/cli.py``)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .common import add_engine_args, open_engine, positive_int


def format_info(d: dict) -> str:
    lines = [f"{d.get('path', '')}  [{d.get('kind', '?')}]"]
    if "taps" in d:
        lines.append("  taps: " + ", ".join(f"{t['name']} ({t['channels']} ch, /{t['stride']})" for t in d["taps"]))
    for key, label in (("default_size", "input size (H, W)"), ("size_range", "dynamic size range"), ("resize", "resize"),
                       ("batch", "batch"), ("base_model", "base model"), ("variant", "variant"), ("student", "student"),
                       ("prompt", "baked prompt"), ("timestep", "timestep"), ("native_size", "native size"),
                       ("text_conditioning", "text conditioning"), ("head_conditioning", "projection heads"),
                       ("package_version", "written by cleandift-rt"), ("file_bytes", "file bytes"),
                       ("external_data", "external data"), ("tensorrt", "TensorRT"), ("note", "note")):
        if d.get(key) not in (None, [], {}):
            lines.append(f"  {label}: {d[key]!r}" if key == "prompt" else f"  {label}: {d[key]}")
    if "text_conditioning" in d and d["text_conditioning"] is None:
        lines.append("  text conditioning: not recorded (the public release's students trained with captions)")
    build = d.get("build") or {}
    if build:  # a TensorRT plan's build summary
        capability = ".".join(map(str, build.get("gpu_capability", []))) or "?"
        parts = [f"{build.get('gpu_name', '?')} (compute {capability})", "fp16" if build.get("fp16") else "fp32"]
        if "engine_layers" in build:
            parts.append(f"{build['engine_layers']} layers")
        if build.get("precision_mix"):
            parts.append("precision " + ", ".join(f"{k} {v}" for k, v in sorted(build["precision_mix"].items())))
        if "build_seconds" in build:
            parts.append(f"built in {build['build_seconds']:.0f} s")
        lines.append("  built for: " + "; ".join(parts))
    lines.extend(f"  WARNING: {w}" for w in d.get("warnings", []))
    return "\n".join(lines)


def cmd_info(args) -> int:
    from ..formats.artifact import describe

    d = describe(args.file)
    d.setdefault("path", str(args.file))
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def cmd_build_info(args) -> int:
    from ..build_info import build_info, format_build_info

    print(json.dumps(build_info(), indent=2) if args.json else format_build_info())
    return 0


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
    """Add the 'info', 'build-info', 'bench' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("info", formatter_class=fmt, help="what an engine / student file holds",
                       description="Taps, input size, resize policy, prompt, base model and version of an exported "
                       "engine, or the U-Net facts of a student file. Reads metadata only (fast, no GPU).\n\n"
                       "example:\n  cleandift-rt info sd21.onnx")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build-info", help="native build, SIMD, CUDA, ONNX Runtime, TensorRT of this install")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_build_info)

    p = sub.add_parser("bench", formatter_class=fmt, help="time extraction and matching on this machine",
                       description="Quick timing of Engine.extract and cleandift_rt.match on the bundled photos.\n"
                       "The full comparisons (release extractor, DIFT, faiss) are the scripts in bench/.\n\n"
                       "example:\n  cleandift-rt bench --engine sd21.onnx --batch 4")
    add_engine_args(p)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--repeat", type=positive_int, default=3)
    p.set_defaults(func=cmd_bench)
