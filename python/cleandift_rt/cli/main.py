"""``cleandift-rt``: the command line. Every subcommand's ``--help`` shows a worked example.

Errors in what the user passed (missing files, wrong taps, bad sizes) end with one ``error:`` line
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..taps import DEFAULT_TAP, TAPS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DESCRIPTION = """\
cleandift-rt: noise-free dense features from Stable Diffusion U-Nets (CleanDIFT), fast.

Start here (no weights needed, about a minute on a laptop CPU):
  cleandift-rt demo --out demo/          builds a tiny untrained model, exports it to ONNX,
                                         extracts features and writes match / PCA pictures

With a real model (a CleanDIFT student exported by `python export/export_onnx.py`):
  cleandift-rt info sd21.onnx                            what the file holds (taps, size, prompt)
  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out matches.png
  cleandift-rt pca a.jpg b.jpg --engine sd21.onnx --out pca.png
  cleandift-rt extract photos/ --engine sd21.onnx --out feats/ --taps us6
  cleandift-rt eval-spair --root SPair-71k --engine sd21.onnx --base sd21/ --out results.json \\
      --baseline dift
An engine is an .onnx file, a TensorRT .plan, or a student .safetensors file (then pass --base,
the base model folder that provides the VAE and text encoder).
"""


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def positive_int(text: str) -> int:
    """argparse type for counts: argparse then reports a bad value in its usual one-line form."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _add_engine_args(p: argparse.ArgumentParser, tap: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", required=True, metavar="FILE",
                   help=".onnx, .plan, or a student .safetensors / diffusers folder (PyTorch backend)")
    g.add_argument("--base", metavar="DIR", help="base SD model (diffusers folder or .safetensors): needed for "
                   "student files; gives the text encoder for prompts")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: the best available)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size for dynamic-size engines and the PyTorch backend (multiples of 64)")
    if tap:
        g.add_argument("--tap", default=DEFAULT_TAP, choices=TAPS,
                       help=f"feature tap to use (default {DEFAULT_TAP}, DIFT's choice for correspondence)")


def _open_engine(args, taps=None):
    from ..runtime.engine import Engine

    kwargs = {"base": args.base, "device": args.device, "taps": taps}
    if args.size:
        kwargs["size"] = tuple(args.size)
    return Engine(args.engine, **kwargs)


def _engine_identity(args, engine) -> str:
    from ..evaluation.runner import file_identity, short_hash

    parts = [file_identity(args.engine), engine.size, engine.resize]
    if args.base:
        parts.append(file_identity(args.base))
    return short_hash(*parts)


def _load_image(path: Path):
    from ..features.preprocess import load_image

    try:
        return load_image(path)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def _tap_map(engine, images, tap: str):
    """``[C, h, w]`` float32 tensors of one tap for each PIL image."""
    import torch

    out = []
    for img in images:
        f = engine.extract([img], taps=[tap])[tap]
        out.append(torch.as_tensor(np.asarray(f))[0].float())
    return out


def _save_png(img, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--out {path}: pictures are written as .png (or .jpg / .webp)")
    img.save(path)


def _write_json(obj, path: Path) -> None:
    from ..checkpoint import atomic_write_bytes

    payload = json.dumps(obj, indent=2).encode()
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(payload))


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, size=args.size)


# ---------------------------------------------------------------------------------------------
# match


def dense_matches(fa, fb, size_a, size_b, mutual: bool = True):
    """Nearest neighbours between all feature cells of two ``[C, h, w]`` maps.

    Returns points in image A, points in image B (cell centres in original pixels) and cosine
    similarities, for mutual nearest neighbours only when ``mutual``.
    """
    from ..kernels.matching import match

    idx, sim = match(fa[None].contiguous(), fb[None].contiguous(), mutual=mutual)
    idx, sim = np.asarray(idx)[0], np.asarray(sim)[0]
    (ha, wa), (hb, wb) = fa.shape[1:], fb.shape[1:]
    keep = np.nonzero(idx >= 0)[0]
    src = np.stack([keep % wa, keep // wa], 1)
    dst = np.stack([idx[keep] % wb, idx[keep] // wb], 1)
    pa = (src + 0.5) * np.array([size_a[0] / wa, size_a[1] / ha]) - 0.5
    pb = (dst + 0.5) * np.array([size_b[0] / wb, size_b[1] / hb]) - 0.5
    return pa, pb, sim[keep]


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
    from ..evaluation.transfer import transfer_points
    from ..viz.pictures import draw_matches

    a_path, b_path = Path(args.image_a), Path(args.image_b)
    a, b = _load_image(a_path), _load_image(b_path)
    pts = _parse_points(args.points) if args.points else None
    if pts is not None:
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < a.width) & (pts[:, 1] >= 0) & (pts[:, 1] < a.height)
        if not inside.all():
            raise UserError(f"points {pts[~inside].tolist()} lie outside image A ({a.width}x{a.height})")
    engine = _open_engine(args, taps=[args.tap])
    fa, fb = _tap_map(engine, [a, b], args.tap)
    if pts is not None:
        pb, sim = transfer_points(fa, fb, a.size, b.size, pts)
        pa, mode = pts, "keypoints (bilinear upsampling to image size, cosine argmax)"
    else:
        pa, pb, sim = dense_matches(fa, fb, a.size, b.size, mutual=True)
        mode = f"mutual nearest neighbours of the {fa.shape[2]}x{fa.shape[1]} and {fb.shape[2]}x{fb.shape[1]} feature grids"
    order = np.argsort(-sim, kind="stable")
    title = f"{a_path.name} -> {b_path.name}: tap {args.tap}, {mode.split(' (')[0]}"
    picture = draw_matches(a, b, pa, pb, sim, max_lines=args.max_lines, title=title)
    _save_png(picture, Path(args.out))
    print(f"{len(pa)} matches ({mode}); picture: {args.out}")
    if args.json:
        _write_json({"image_a": str(a_path), "image_b": str(b_path), "size_a": list(a.size), "size_b": list(b.size),
                     "engine": str(args.engine), "tap": args.tap, "mode": mode,
                     "matches": [{"a": [round(float(v), 2) for v in pa[i]], "b": [round(float(v), 2) for v in pb[i]],
                                  "similarity": round(float(sim[i]), 6)} for i in order]}, Path(args.json))
        print(f"matches as JSON (most confident first): {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------
# pca, extract, info, build-info, bench


def cmd_pca(args) -> int:
    from ..viz.pictures import feature_pca

    paths = [Path(p) for p in args.images]
    images = [_load_image(p) for p in paths]
    engine = _open_engine(args, taps=[args.tap])
    feats = _tap_map(engine, images, args.tap)
    title = f"feature PCA, tap {args.tap}: " + ", ".join(p.name for p in paths)
    _save_png(feature_pca(feats, images, height=args.height, title=title), Path(args.out))
    print(f"PCA picture of {len(images)} image(s), tap {args.tap} ({feats[0].shape[0]} channels): {args.out}")
    return 0


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
    engine = _open_engine(args, taps=args.taps)
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

    engine = _open_engine(args, taps=[args.tap])
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


# ---------------------------------------------------------------------------------------------
# evaluation


def _prepare_methods(args):
    """(main feature source, baseline source or None, engine) from the parsed arguments."""
    from ..evaluation.runner import DiftFeatures, EngineFeatures, file_identity, short_hash

    from ..models.base import load_base

    engine = _open_engine(args)
    prompt = args.prompt or None
    # One base model serves as the text encoder for the prompts and as the DIFT baseline's U-Net;
    # the PyTorch backend already holds it (an SD 2.1 base is 5 GB: never load it twice).
    base_model = None
    if args.base and (args.baseline or prompt):
        base_model = getattr(getattr(engine.backend, "ref", None), "base", None) or load_base(args.base)
    if args.baseline and base_model is None:
        raise UserError("--baseline dift runs the base model's U-Net: pass --base DIR (the SD folder the student "
                        "was trained from)")
    if prompt and base_model is None:
        print(f"note: no --base given, so no text encoder for the prompt {prompt!r}: using the prompt baked into "
              f"the engine ({engine.info.get('prompt', '')!r}). Pass --base DIR for SPEC section 6's prompt.")
        prompt = None
    main = EngineFeatures(engine, args.tap, key=_engine_identity(args, engine), prompt=prompt, text_model=base_model)
    baseline = None
    if args.baseline:
        from ..features.extractor import DiftExtractor

        dift = DiftExtractor(base_model, t=args.t, ensemble=args.ensemble, seed=args.seed, size=engine.size,
                             device=args.device or "cpu")
        baseline = DiftFeatures(dift, args.tap, key=short_hash(file_identity(args.base)), prompt=prompt)
    return main, baseline


def _run_eval(args, pairs, skips, benchmark: str, dataset_key: str) -> int:
    from ..evaluation.pck import CONVENTIONS
    from ..evaluation.report import format_table, results_document, write_results
    from ..evaluation.runner import evaluate, short_hash
    from ..evaluation.pairs import SkipLog

    if not pairs:
        raise UserError(f"no usable pairs in {benchmark}" + ("; " + "; ".join(skips.lines()) if skips.lines() else ""))
    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out {out}: results are written as JSON (e.g. results.json); the CSV goes beside it")
    cache = Path(args.cache) if args.cache else out.parent / f"{out.stem}.cache"
    main, baseline = _prepare_methods(args)
    inclusive = CONVENTIONS[args.threshold]
    runs = []
    for source in [main] + ([baseline] if baseline else []):
        journal = cache / f"journal-{source.key}-{args.transfer}-{dataset_key}.jsonl"
        if args.restart and journal.exists():
            journal.unlink()
        run_skips = SkipLog()
        run_skips.merge(skips)
        runs.append(evaluate(pairs, source, cache_dir=cache / "features", journal=journal, skips=run_skips,
                             progress=not args.no_progress, method=args.transfer))
    protocol = {"benchmark": benchmark, "tap": args.tap, "prompt": args.prompt, "threshold": args.threshold,
                "alphas": args.alphas, "engine": str(args.engine), "base": args.base,
                "upsampling": "bilinear to the original image size (align_corners=False)",
                "matching": "cosine argmax over all target pixels", "transfer": args.transfer, "cache": str(cache),
                "dataset_key": short_hash(dataset_key)}
    doc = results_document(runs[0], runs[1] if len(runs) > 1 else None, protocol, args.alphas, inclusive)
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    write_results(doc, out, csv_path)
    print(format_table(doc))
    for run in runs:
        if run.images_extracted:
            print(f"{run.source['method']}: {run.extract_seconds / run.images_extracted:.2f} s per image extracted")
    print(f"results: {out} and {csv_path}; features cached in {cache} (rerun to resume)")
    return 0


def cmd_eval_spair(args) -> int:
    from ..evaluation.spair import load_spair

    pairs, skips = load_spair(args.root, args.split, categories=args.categories, limit=args.limit)
    return _run_eval(args, pairs, skips, f"SPair-71k {args.split}",
                     f"spair-{Path(args.root).resolve()}-{args.split}")


def cmd_eval_pairs(args) -> int:
    from ..evaluation.pairs import load_pairs
    from ..evaluation.runner import file_identity

    pairs, skips = load_pairs(args.pairs, args.images)
    if args.limit:
        pairs = pairs[: args.limit]
    return _run_eval(args, pairs, skips, Path(args.pairs).name, f"pairs-{file_identity(args.pairs)}")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation.pck import ALPHAS, CONVENTIONS
    from ..evaluation.runner import DEFAULT_PROMPT

    _add_engine_args(p)
    p.add_argument("--out", required=True, metavar="results.json", help="results JSON (a CSV is written beside it)")
    p.add_argument("--csv", metavar="FILE", help="CSV path (default: --out with .csv)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"prompt template, {{category}} filled in (default {DEFAULT_PROMPT!r}, needs --base); "
                   "'' = the prompt baked into the engine")
    p.add_argument("--baseline", choices=["dift"], help="also run the noisy DIFT baseline (base U-Net, needs --base)")
    p.add_argument("--t", type=int, default=261, help="DIFT timestep (default 261)")
    p.add_argument("--ensemble", type=positive_int, default=8, help="DIFT noise samples averaged (default 8)")
    p.add_argument("--seed", type=int, default=0, help="DIFT noise seed (default 0)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="PCK thresholds (default 0.05 0.1 0.15)")
    p.add_argument("--threshold", choices=list(CONVENTIONS), default="dift",
                   help="'dift': correct if distance <= alpha*size (default); 'tlfr': strictly <")
    p.add_argument("--transfer", choices=["matcher", "analytic"], default="matcher",
                   help="'matcher': upsampled target searched by cleandift_rt.match (default); 'analytic': the same "
                   "cosines in closed form, no upsampled map (float64, much faster on a CPU)")
    p.add_argument("--limit", type=positive_int, help="at most N pairs (per category for SPair): a quick look")
    p.add_argument("--cache", metavar="DIR", help="feature cache and resume journal (default: OUT_STEM.cache beside --out)")
    p.add_argument("--restart", action="store_true", help="ignore the journal of an earlier run (features stay cached)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="cleandift-rt", description=DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", formatter_class=fmt, help="end to end on bundled photos with a tiny untrained model",
                       description="Build a tiny model (no download), export it to ONNX, run the Engine, match and "
                       "draw.\n\nexample:\n  cleandift-rt demo --out demo/\n\nThe model is UNTRAINED: the pictures "
                       "show that the pipeline works, not what trained CleanDIFT features look like.")
    p.add_argument("--out", required=True, metavar="DIR", help="where the pictures (and the tiny model) go")
    p.add_argument("--size", type=int, default=256, help="engine input size in pixels (multiple of 64, default 256)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("match", formatter_class=fmt, help="match two images; picture + JSON",
                       description="Match image A to image B with one tap's features.\n\n"
                       "Without --points: mutual nearest neighbours between the two feature grids (dense).\n"
                       "With --points: each point of A goes to the pixel of B with the most similar feature\n"
                       "(features upsampled to the image sizes, as in the SPair protocol).\n\nexamples:\n"
                       "  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out matches.png --json matches.json\n"
                       "  cleandift-rt match a.jpg b.jpg --engine sd21.onnx --out kp.png --points '120,80 200,95'")
    p.add_argument("image_a")
    p.add_argument("image_b")
    _add_engine_args(p)
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
    _add_engine_args(p)
    p.add_argument("--out", required=True, metavar="pca.png")
    p.add_argument("--height", type=positive_int, default=256, help="picture height per row in pixels (default 256)")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("extract", formatter_class=fmt, help="features of many images to files",
                       description="Write one feature file per image (taps as named arrays; source size in the "
                       "metadata). Resumable: finished files are kept; unreadable images are skipped and "
                       "listed.\n\nexample:\n  cleandift-rt extract photos/ --engine sd21.onnx --out feats/ --taps us6 us9")
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR")
    _add_engine_args(p, tap=False)
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
    _add_engine_args(p)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--repeat", type=positive_int, default=3)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval-spair", formatter_class=fmt, help="PCK on SPair-71k (CleanDIFT and the DIFT baseline)",
                       description="PCK@0.05/0.1/0.15 (bbox and img; per point and per image; per category) on "
                       "SPair-71k as in DIFT: images resized to the model size, features upsampled bilinearly to "
                       "the original size, cosine argmax over all target pixels. Features are cached per image; "
                       "an interrupted run resumes.\n\nexample:\n"
                       "  cleandift-rt eval-spair --root SPair-71k --engine sd21.onnx --base sd21/ --out results.json "
                       "--baseline dift --t 261 --ensemble 8")
    p.add_argument("--root", required=True, metavar="DIR", help="SPair-71k folder (PairAnnotation/, JPEGImages/)")
    p.add_argument("--split", default="test", choices=["test", "val", "trn"])
    p.add_argument("--categories", nargs="+", metavar="CAT", help="only these categories")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval_spair)

    p = sub.add_parser("eval-pairs", formatter_class=fmt, help="PCK on PF-Pascal / PF-Willow CSVs or your pairs.json",
                       description="The same evaluation on PF-Pascal (test_pairs_pf_pascal.csv), PF-Willow "
                       "(test_pairs_pf.csv) or a pairs.json of your own (format: docs/evaluation.md).\n\nexample:\n"
                       "  cleandift-rt eval-pairs PF-dataset-PASCAL/test_pairs_pf_pascal.csv --engine sd21.onnx --out pf.json")
    p.add_argument("pairs", metavar="PAIRS", help="a .csv (PF-Pascal / PF-Willow) or a pairs.json")
    p.add_argument("--images", metavar="DIR", help="folder the image paths are relative to (default: next to PAIRS)")
    _add_eval_args(p)
    p.set_defaults(func=cmd_eval_pairs)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, OSError, ImportError, RuntimeError) as exc:
        if os.environ.get("CLEANDIFT_RT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
