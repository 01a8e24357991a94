"""``cleandift-rt extract | info | build-info | bench``: the commands that drive an Engine or describe one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..cli.common import UserError, add_engine_args, open_engine, positive_int
from ..taps import TAPS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _collect_images(inputs) -> list[tuple[Path, Path]]:
    """(image path, output path relative to --out) for files and directories (recursive)."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()):
                found.append((f, f.relative_to(p)))
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise UserError(f"{p} does not exist")
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    names = [rel for _, rel in found]
    if len(set(names)) != len(names):
        raise UserError("two inputs would write the same output file; pass one directory instead of same-named files")
    return found


def _feature_file_complete(path: Path, fmt: str, taps) -> bool:
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                return set(taps) <= set(f.keys())
        with np.load(path) as z:
            return set(taps) <= set(z.files)
    except Exception:  # half-written or foreign file: extract again
        return False


def _write_features(path: Path, feats: dict, fmt: str, meta: dict) -> None:
    from ..checkpoint import atomic_write_bytes

    arrays = {t: np.ascontiguousarray(np.asarray(f)) for t, f in feats.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        atomic_write_bytes(path, lambda tmp: save_file(arrays, tmp, metadata={k: str(v) for k, v in meta.items()}))
    else:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write_bytes(path, write)


def cmd_extract(args) -> int:
    from PIL import UnidentifiedImageError

    from ..features.preprocess import load_image
    from tqdm.auto import tqdm

    items = _collect_images(args.inputs)
    engine = open_engine(args, taps=args.taps)
    taps = engine.taps
    out_dir = Path(args.out)
    suffix = ".safetensors" if args.format == "safetensors" else ".npz"
    todo, done, failed = [], 0, []
    for src, rel in items:
        dst = out_dir / rel.with_suffix(suffix)
        if dst.exists() and _feature_file_complete(dst, args.format, taps):
            done += 1
        else:
            todo.append((src, dst))
    print(f"{len(items)} image(s): {done} already extracted, {len(todo)} to do; taps {', '.join(taps)}; "
          f"engine input {engine.size[0]}x{engine.size[1]} ({engine.resize})")
    t0 = time.perf_counter()
    for src, dst in tqdm(todo, desc="extract", unit="img", disable=args.no_progress):
        try:
            image = load_image(src)
            feats = engine.extract([image], taps=list(taps))
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
            failed.append((src, str(exc).splitlines()[0]))
            continue
        _write_features(dst, {t: np.asarray(f)[0] for t, f in feats.items()}, args.format,
                        {"image": src, "width": image.width, "height": image.height, "engine": args.engine,
                         "taps": ",".join(taps), "input_size": "x".join(map(str, engine.size))})
    n_ok = len(todo) - len(failed)
    rate = f" ({n_ok / (time.perf_counter() - t0):.2f} img/s)" if n_ok else ""
    print(f"wrote {n_ok} feature file(s) to {out_dir}{rate}")
    if failed:
        print(f"skipped {len(failed)} unreadable image(s):")
        for src, why in failed[:20]:
            print(f"  {src}: {why}")
    return 1 if failed and n_ok == 0 and done == 0 else 0


def format_info(d: dict) -> str:
    lines = [f"{d.get('path', '')}  [{d.get('kind', '?')}]"]
    if "taps" in d:
        lines.append("  taps: " + ", ".join(f"{t['name']} ({t['channels']} ch, /{t['stride']})" for t in d["taps"]))
    for key, label in (("default_size", "input size (H, W)"), ("size_range", "dynamic size range"), ("resize", "resize"),
                       ("batch", "batch"), ("base_model", "base model"), ("variant", "variant"), ("student", "student"),
                       ("prompt", "baked prompt"), ("timestep", "timestep"), ("native_size", "native size"),
                       ("package_version", "written by cleandift-rt"), ("file_bytes", "file bytes"),
                       ("external_data", "external data"), ("tensorrt", "TensorRT"), ("note", "note")):
        if d.get(key) not in (None, [], {}):
            lines.append(f"  {label}: {d[key]!r}" if key == "prompt" else f"  {label}: {d[key]}")
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
    """Add the 'extract', 'info', 'build-info', 'bench' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("extract", formatter_class=fmt, help="features of many images to files",
                       description="Write one feature file per image (taps as named arrays; source size in the "
                       "metadata). Resumable: finished files are kept; unreadable images are skipped and "
                       "listed.\n\nexample:\n  cleandift-rt extract photos/ --engine sd21.onnx --out feats/ --taps us6 us9")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR")
    add_engine_args(p, tap=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--taps", nargs="+", choices=TAPS, help="taps to save (default: all of the engine's)")
    p.add_argument("--format", choices=["safetensors", "npz"], default="safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)

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
