"""Feature extraction speed on this CPU: our Engine vs a release-style extractor vs the DIFT baseline.

SD2.1-size architecture with random weights (never downloaded: ``build_models("sd21")``, written
once to a cache folder as a diffusers model so every contender loads the same files). Each
contender runs in its own subprocess, so its peak memory (max RSS, weights included) is its own.

Contenders:
  engine-ort           cleandift_rt.Engine on an exported .onnx (ONNX Runtime CPU, graph ends at the last tap)
  engine-openvino-fp32 the same .onnx on the Engine's OpenVINO backend, fp32 (explicit f32 hint)
  engine-openvino-bf16 the same in native bf16 (OpenVINO's bf16 hint; fp32 on CPUs without native bf16)
  engine-openvino-int8 the int8 file of that .onnx (export --precision int8: NNCF accuracy control on the bundled
                       photos, --int8-max-drop / --int8-max-iterations / --int8-min-agreement) on OpenVINO,
                       float layers bf16 where native
  engine-ort-int8      the same int8 file on ONNX Runtime's CPU provider
  engine-torch-fp32    cleandift_rt.Engine PyTorch backend (eager, forward stopped after the last tap)
  engine-torch-bf16    the same under CPU bf16 autocast (fp32 on CPUs without native bf16)
  release-fp32         written like the public release: eager, VAE posterior, hooks on the 11 taps,
                       the whole U-Net forward (decoder and conv_out) every time
  release-bf16         the same under CPU bf16 autocast
  openvino-full-fp32   peer: OpenVINO on plain ONNX exports of the VAE encoder and the whole U-Net (no
  openvino-full-bf16   pruning, timestep as an input), taps as extra outputs (bench/_openvino_full.py)
  dift                 noisy DIFT baseline (foundation's DiftExtractor): 8-sample ensemble at t=261
  <engine contender>-fast  that engine (ort, openvino-fp32/bf16, torch-fp32/bf16) with a fast encoder (AutoencoderTiny,
                       TAESD's architecture, random weights) in place of the VAE encoder (bench/_fast_encoder.py)

Accuracy: every contender but DIFT also extracts two bundled photos; per tap, the cosine to the fp32
reference (the Engine's PyTorch backend, else the first fp32 contender) and how often us6 dense
matching (cosine argmax per pixel from one photo to the other) picks the same target. int8 is held
to its own targets (issue 30): 1.4x the OpenVINO bf16 engine, per-tap cosine >= 0.99, peak memory
at most bf16's; the issue-13 ratios (engine-best) compare the floating-point engines.

    python bench/extract.py --quick                 # 512 px, batch 1, all taps and us6
    python bench/extract.py --sizes 512 768 --batches 1 4
    python bench/extract.py --fast-encoder          # issue 31: fast vs VAE encoder, 512 px all taps, 256 px us3+us6+us8
Writes bench/results/extract-<time>.json (compare runs with --compare OLD.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openvino_full import OpenVINOFullModel, export_full  # noqa: E402
import _fast_encoder as fast_encoder  # noqa: E402

CONTENDERS = ("engine-ort", "engine-openvino-fp32", "engine-openvino-bf16", "engine-openvino-int8", "engine-ort-int8",
              "engine-torch-fp32", "engine-torch-bf16",
              "release-fp32", "release-bf16", "openvino-full-fp32", "openvino-full-bf16", "dift") + \
    fast_encoder.FAST_CONTENDERS
PEERS = ("release-fp32", "release-bf16", "release-best", "openvino-full-fp32", "openvino-full-bf16", "dift")
REFERENCES = ("engine-torch-fp32", "engine-ort", "engine-openvino-fp32", "release-fp32")  # fp32, first present
ACCURACY_PHOTOS = ("cat", "coffee")
TAP_SETS = {"all": None, "us6": ["us6"], "robot": fast_encoder.ROBOT_TAPS}
TARGETS = [  # (ours, baseline, tap set, minimum ratio, CPU kind: native bf16 or not) from issue 13
    ("engine-best", "release-best", "us6", 2.0, True),
    ("engine-best", "release-best", "all", 1.6, True),
    ("engine-best", "release-fp32", "us6", 2.5, True),
    ("engine-best", "release-fp32", "all", 2.5, True),
    ("engine-best-fp32", "openvino-full-fp32", "us6", 1.2, True),
    ("engine-best-fp32", "openvino-full-fp32", "all", 1.0, True),
    ("engine-best-bf16", "openvino-full-bf16", "us6", 1.2, True),
    ("engine-best-bf16", "openvino-full-bf16", "all", 1.0, True),
    ("engine-best", "release-fp32", "us6", 1.5, False),
    ("engine-openvino-int8", "engine-openvino-bf16", "us6", 1.4, True),  # issue 30, CPUs with VNNI / AMX-INT8
    ("engine-openvino-int8", "engine-openvino-bf16", "all", 1.4, True),
]
MIN_COSINE = {"int8": 0.99}  # per tap against the fp32 reference, by the contender's last word; else bf16's 0.995


# -- the model on disk ----------------------------------------------------------------------


def ensure_random_sd21(folder: Path) -> Path:
    """A diffusers folder with SD 2.1-size random weights (U-Net, VAE, text encoder, byte-level tokenizer)."""
    if (folder / "model_index.json").is_file():
        return folder
    from cleandift_rt.models import write_random_base

    print(f"writing random SD2.1-size weights to {folder} (once)", flush=True)
    tmp = folder.with_name(folder.name + ".partial")
    write_random_base(tmp, "sd21")
    tmp.rename(folder)
    return folder


def ensure_model(model: str, cache: Path) -> Path:
    """The model folder in ``cache`` for ``model`` ("tiny": the tiny test model; else SD2.1-size random
    weights), written once."""
    if model != "tiny":
        return ensure_random_sd21(cache / "sd21-random")
    tiny = cache / "tiny"
    if not (tiny / "model_index.json").is_file():
        from cleandift_rt.models import write_tiny_base

        write_tiny_base(tiny, seed=0)
    return tiny


def model_tag(model_dir: Path) -> str:
    return "tiny" if Path(model_dir).name == "tiny" else "sd21"


def full_export_dir(model_dir: Path, cache: Path, size: int) -> Path:
    return cache / f"{model_tag(model_dir)}-{size}-full-unet"


def ensure_int8(model_dir: Path, cache: Path, size: int, taps, args) -> Path:
    """The int8 file of ``ensure_onnx``'s graph, as ``export --precision int8`` makes it (bundled photos), with
    the ``--int8-*`` flags of ``args``."""
    max_drop, max_iterations, min_agreement = args.int8_max_drop, args.int8_max_iterations, args.int8_min_agreement
    fp32 = ensure_onnx(model_dir, cache, size, taps)
    agreement = f"-a{min_agreement:g}" if min_agreement is not None else ""
    path = fp32.with_name(f"{fp32.stem}.int8-d{max_drop:g}-i{max_iterations or 'all'}{agreement}.onnx")
    unverified = path.with_name(path.stem + ".unverified.onnx")  # below its target: timed, and its accuracy shown
    if not path.is_file() and not unverified.is_file():
        from cleandift_rt.export.int8 import Int8Options, Int8TargetMissed, write_int8_onnx

        try:
            write_int8_onnx(fp32, path, Int8Options(max_drop=max_drop, max_iterations=max_iterations,
                                                    min_agreement=min_agreement),
                            log=lambda *a: print(*a, file=sys.stderr, flush=True))
        except Int8TargetMissed as exc:
            print(f"int8: {exc}", file=sys.stderr, flush=True)
    return path if path.is_file() else unverified


def ensure_onnx(model_dir: Path, cache: Path, size: int, taps, encoder: Path | None = None) -> Path:
    fast = "-fast" if encoder is not None else ""
    name = f"{model_tag(model_dir)}-{size}-{'all' if taps is None else '-'.join(taps)}{fast}.onnx"
    path = cache / name
    if not path.is_file():
        from cleandift_rt.models import Student, load_base
        from cleandift_rt.export.onnx_export import export_onnx

        base = load_base(model_dir)
        t0 = time.perf_counter()
        export_onnx(Student(unet=base.unet, source=str(model_dir)), base, path, size=(size, size), taps=taps,
                    encoder=encoder)
        print(f"exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# -- one contender, in a worker process -----------------------------------------------------


class ReleaseStyleExtractor:
    """How the public release extracts: hooks on the tap modules, the full U-Net forward every time."""

    def __init__(self, model_dir: Path, bf16: bool):
        import torch

        from cleandift_rt.models import load_base
        from cleandift_rt.taps import TAP_TABLE, TAPS

        self.torch, self.base, self.bf16 = torch, load_base(model_dir), bf16
        self.embeds = self.base.encode_prompt("")
        self.captured = {}
        for name in TAPS:
            module = self.base.unet.get_submodule(TAP_TABLE[name].module)
            module.register_forward_hook(lambda _m, _i, out, name=name: self.captured.__setitem__(
                name, out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))

    def extract(self, pixels, taps):
        torch = self.torch
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            latents = self.base.vae.encode(pixels).latent_dist.mean * self.base.scaling_factor
            self.base.unet(latents, 261, encoder_hidden_states=self.embeds.expand(len(pixels), -1, -1))
        return {t: self.captured[t].float() for t in (taps or self.captured)}


def worker(args) -> dict:
    import torch

    from cleandift_rt.features.preprocess import prepare_images

    model_dir, cache = Path(args.model_dir), Path(args.cache)
    taps = TAP_SETS[args.tap_set]
    t0 = time.perf_counter()
    name, fast = fast_encoder.split(args.worker)  # name-fast: the engine with the fast encoder in place of the VAE's
    encoder = fast_encoder.ensure_fast_encoder(model_dir, cache, model_tag(model_dir)) if fast else None
    if name == "export":  # in its own process, so that no contender's peak memory includes it
        return {"onnx": str(ensure_onnx(model_dir, cache, args.size, taps, encoder))}
    if name == "export-int8":
        return {"onnx": str(ensure_int8(model_dir, cache, args.size, taps, args))}
    if name == "export-full":
        return {"folder": str(export_full(model_dir, full_export_dir(model_dir, cache, args.size), args.size))}
    if name.startswith(("engine-ort", "engine-openvino")):
        from cleandift_rt import Engine

        backend = "onnxruntime" if name.startswith("engine-ort") else "openvino"
        precision = name.rsplit("-", 1)[1] if name.count("-") == 2 else None  # engine-ort: fp32
        path = (ensure_int8(model_dir, cache, args.size, taps, args)
                if precision == "int8" else ensure_onnx(model_dir, cache, args.size, taps, encoder))
        engine = Engine(path, device="cpu", backend=backend, precision=precision)
        run = lambda x: engine.extract(x)  # noqa: E731
        detail = {k: engine.info[k] for k in ("backend", "precision", "threads", "providers", "compute_precision",
                                               "openvino_hint", "timestep_embedding") if k in engine.info}
    elif name.startswith("engine-torch"):
        from cleandift_rt import Engine

        engine = Engine(model_dir, taps=taps, size=(args.size, args.size), precision=name.rsplit("-", 1)[1],
                        encoder=encoder)
        run = lambda x: engine.extract(x)  # noqa: E731
        detail = {"backend": "pytorch", "precision": engine.info["precision"], "threads": torch.get_num_threads()}
    elif name.startswith("release"):
        ref = ReleaseStyleExtractor(model_dir, bf16=name.endswith("bf16"))
        run = lambda x: ref.extract(prepare_images(x, args.size).pixels, taps)  # noqa: E731
        detail = {"precision": name.rsplit("-", 1)[1], "threads": torch.get_num_threads()}
    elif name.startswith("openvino-full"):
        from cleandift_rt.runtime.backends.common import available_cpus

        full = OpenVINOFullModel(full_export_dir(model_dir, cache, args.size), name.rsplit("-", 1)[1], available_cpus())
        run = lambda x: full.extract(prepare_images(x, args.size).pixels, taps)  # noqa: E731
        detail = {"precision": {"f32": "fp32"}.get(full.detail["openvino_hint"], full.detail["openvino_hint"]),
                  **full.detail}
    elif name == "dift":
        from cleandift_rt.features.extractor import DiftExtractor
        from cleandift_rt.models import load_base

        from cleandift_rt.taps import TAPS

        dift = DiftExtractor(load_base(model_dir), t=261, ensemble=8, size=args.size)
        run = lambda x: dift.extract(x, taps=taps or TAPS)  # noqa: E731
        detail = {"ensemble": 8, "t": 261, "threads": torch.get_num_threads()}
    else:
        raise SystemExit(f"unknown contender {name}")
    load_seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1
    times = []
    for i in range(args.warmup + args.repeats):
        t1 = time.perf_counter()
        feats = run(images)
        if i >= args.warmup:
            times.append(time.perf_counter() - t1)
    best = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the accuracy pass below
    accuracy = save_accuracy_features(run, args, args.worker) if args.accuracy and name != "dift" else None
    return {"contender": args.worker, "size": args.size, "batch": args.batch, "taps": args.tap_set,
            "seconds": times, "best_seconds": best, "images_per_second": args.batch / best,
            "peak_rss_mib": peak, "load_seconds": load_seconds, "accuracy_features": accuracy,
            "outputs": {k: list(v.shape) for k, v in feats.items()}, **detail}


def save_accuracy_features(run, args, name: str) -> str:
    """Features of the bundled photos (one batch), kept for the driver's comparison with the reference."""
    import numpy as np

    from cleandift_rt.assets import load_photo

    feats = run([load_photo(p) for p in ACCURACY_PHOTOS])
    path = Path(args.cache) / "features" / f"{name}-{args.size}-{args.tap_set}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{t: np.asarray(f, dtype=np.float32) for t, f in feats.items()})
    return str(path)


# -- the driver -----------------------------------------------------------------------------


def run_one(args, contender, size, batch, tap_set) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", contender, "--model-dir", str(args.model_dir), "--cache",
           str(args.cache), "--size", str(size), "--batch", str(batch), "--tap-set", tap_set,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--int8-max-drop", str(args.int8_max_drop)] + \
        (["--int8-max-iterations", str(args.int8_max_iterations)] if args.int8_max_iterations else []) + \
        (["--int8-min-agreement", str(args.int8_min_agreement)] if args.int8_min_agreement is not None else []) + \
        (["--accuracy"] if batch == args.batches[0] else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {contender} failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], native_bf16: bool) -> tuple[list[str], list[dict]]:
    lines, checks = [], []
    keyed = {(r["contender"], r["size"], r["batch"], r["taps"]): r for r in rows}
    for size, batch, tap_set in sorted({(r["size"], r["batch"], r["taps"]) for r in rows}):
        group = {c: keyed[(c, size, batch, tap_set)] for c in CONTENDERS if (c, size, batch, tap_set) in keyed}
        fastest = lambda rs: min(rs, key=lambda r: r["best_seconds"])  # noqa: E731
        engines = [r for c, r in group.items() if c.startswith("engine") and r.get("precision") != "int8"
                   and not fast_encoder.split(c)[1]]  # the fast encoder's ratios are its own (fast_encoder.ratios)
        releases = [r for c, r in group.items() if c.startswith("release")]
        if engines:
            group["engine-best"] = fastest(engines)
            for precision in ("fp32", "bf16"):  # by the precision that actually ran
                same = [r for r in engines if r.get("precision") == precision]
                if same:
                    group[f"engine-best-{precision}"] = fastest(same)
        if releases:
            group["release-best"] = fastest(releases)
        lines.append(f"\n{size} px, batch {batch}, taps {tap_set}:")
        for c, r in group.items():
            ran = " ".join(str(r[k]) for k in ("backend", "precision") if r.get(k))
            tag = f" (= {r['contender']})" if "-best" in c else f" [{ran}]" if ran else ""
            lines.append(f"  {c:20s} {r['images_per_second']:7.4f} img/s  {r['best_seconds']:7.2f} s/batch  "
                         f"peak {r['peak_rss_mib'] / 1024:5.1f} GiB{tag}")
        peers = [p for p in PEERS if p in group]
        if "engine-best" in group and peers:
            best = group["engine-best"]
            lines.append(f"  engine-best ({best['contender']}) against every peer: " + ", ".join(
                f"{p} x{group[p]['best_seconds'] / best['best_seconds']:.2f}" for p in peers))
        for ours, theirs, taps_for, minimum, for_bf16_cpu in TARGETS:
            if taps_for != tap_set or for_bf16_cpu != native_bf16 or ours not in group or theirs not in group:
                continue
            ratio = group[theirs]["best_seconds"] / group[ours]["best_seconds"]
            met = ratio >= minimum
            checks.append({"size": size, "batch": batch, "taps": tap_set, "ours": group[ours]["contender"],
                           "baseline": group[theirs]["contender"], "ratio": ratio, "target": minimum, "met": met})
            lines.append(f"  ratio {ours} ({group[ours]['contender']}) vs {theirs} ({group[theirs]['contender']}): "
                         f"{ratio:.2f}x (target {minimum}x: {'met' if met else 'MISSED'})")
        if "engine-openvino-int8" in group and "engine-openvino-bf16" in group:  # issue 30: int8 peak <= bf16 peak
            peaks = [group[c]["peak_rss_mib"] / 1024 for c in ("engine-openvino-int8", "engine-openvino-bf16")]
            lines.append(f"  peak memory int8 {peaks[0]:.2f} GiB vs bf16 {peaks[1]:.2f} GiB (target <=: "
                         f"{'met' if peaks[0] <= peaks[1] else 'MISSED'})")
    return lines, checks


def accuracy(rows: list[dict], fast: bool = False) -> tuple[list[str], list[dict]]:
    """Per tap cosine to the fp32 reference (min over the photos) and us6 dense-matching agreement; ``fast``: the
    fast-encoder contenders against their own fp32 reference (another encoder gives other features)."""
    import numpy as np
    import torch

    from cleandift_rt import match

    lines, results = [], []
    for size, tap_set in sorted({(r["size"], r["taps"]) for r in rows if r.get("accuracy_features")}):
        saved = {r["contender"]: r["accuracy_features"] for r in rows if (r["size"], r["taps"]) == (size, tap_set)
                 and r.get("accuracy_features") and fast_encoder.split(r["contender"])[1] == fast}
        suffix = fast_encoder.FAST_SUFFIX if fast else ""
        reference = next((c + suffix for c in REFERENCES if c + suffix in saved), None)
        if reference is None:
            continue
        ref = dict(np.load(saved[reference]))
        lines.append(f"\naccuracy at {size} px, taps {tap_set}, against {reference} (photos {', '.join(ACCURACY_PHOTOS)}):")
        for contender, path in saved.items():
            if contender == reference:
                continue
            feats = dict(np.load(path))
            cosines = {}
            for tap in (t for t in ref if t in feats):
                a, b = feats[tap].reshape(len(feats[tap]), -1).astype(np.float64), ref[tap].reshape(len(ref[tap]), -1)
                cosines[tap] = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
            row = {"size": size, "taps": tap_set, "contender": contender, "reference": reference, "cosine": cosines}
            if "us6" in feats and "us6" in ref:
                picks = [match(torch.from_numpy(f[:1]), torch.from_numpy(f[1:2]), precision="fp32")[0]
                         for f in (feats["us6"], ref["us6"])]
                row["us6_same_match"] = float((picks[0] == picks[1]).float().mean())
            results.append(row)
            worst = min(cosines, key=cosines.get)
            target = MIN_COSINE.get(contender.rsplit("-", 1)[-1], 0.995)
            lines.append(f"  {contender:20s} min cosine {cosines[worst]:.5f} ({worst}; target {target}: "
                         f"{'met' if cosines[worst] >= target else 'MISSED'})"
                         + (f", us6 matches as fp32: {row['us6_same_match']:.4f}" if "us6_same_match" in row else ""))
    return lines, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512 px, batch 1 only")
    p.add_argument("--fast-encoder", action="store_true", help="issue 31: the VAE-encoder engines and their fast-encoder "
                   "twins (--contenders, default ONNX Runtime fp32 and OpenVINO fp32 / bf16) at 512 px all taps and "
                   "256 px us3+us6+us8, batch 1")
    p.add_argument("--tiny", action="store_true", help="the tiny test model at 128 px, batch 1: checks the script "
                   "itself in a minute (its ratios say nothing about SD 2.1 size)")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tap-sets", nargs="+", choices=list(TAP_SETS), default=list(TAP_SETS))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point (the best is kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (oneDNN/ORT set-up)")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache", help="random weights and exported models")
    p.add_argument("--compare", type=Path, default=None, help="an earlier result JSON to print ratios against")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="earlier result JSONs of the same points: keep each point's fastest run (noisy machines)")
    p.add_argument("--int8-max-drop", type=float, default=0.01, help="the int8 contenders' --max-drop (default "
                   "0.01: per-tap cosine >= 0.99, the product's default)")
    p.add_argument("--int8-max-iterations", type=int, default=None, help="bound accuracy control's reverts for the "
                   "int8 contenders (default: as many as it takes; each costs an OpenVINO compile of the model)")
    p.add_argument("--int8-min-agreement", type=float, default=None, help="the int8 contenders' --min-agreement "
                   "(default: none, as the product's default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tap-set", default=None, help=argparse.SUPPRESS)
    p.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick or args.tiny:
        args.sizes, args.batches = ([128] if args.tiny else [512]), [1]
    combos = [(s, t) for s in args.sizes for t in args.tap_sets]  # (size, tap set) points
    if args.fast_encoder:
        args.batches = [1]
        combos = [(128 if args.tiny else size, taps) for size, taps, _ in fast_encoder.TARGETS]
        if args.contenders == list(CONTENDERS):
            args.contenders = [c + f for c in ("engine-ort", "engine-openvino-fp32", "engine-openvino-bf16")
                               for f in ("", fast_encoder.FAST_SUFFIX)]
    args.cache.mkdir(parents=True, exist_ok=True)
    args.model_dir = ensure_model("tiny" if args.tiny else "sd21", args.cache)
    from tqdm import tqdm

    from cleandift_rt.build_info import build_info

    for size in sorted({s for s, _ in combos}):  # exports in their own processes, before any timing
        exported = [c for c in args.contenders if c.startswith(("engine-ort", "engine-openvino"))]
        if exported:
            for tap_set in [t for s, t in combos if s == size]:
                for fast in (False, True):  # the VAE-encoder graph, the fast-encoder graph: those timed
                    job = "export" + (fast_encoder.FAST_SUFFIX if fast else "")
                    if any(fast_encoder.split(c)[1] == fast for c in exported) and \
                            run_one(args, job, size, 1, tap_set) is None:
                        return 1
                if any(c.endswith("-int8") for c in args.contenders) and \
                        run_one(args, "export-int8", size, 1, tap_set) is None:
                    return 1
        if any(c.startswith("openvino-full") for c in args.contenders) and run_one(args, "export-full", size, 1, "all") is None:
            return 1
    points = [(c, s, b, t) for s, t in combos for b in args.batches for c in args.contenders]
    rows = []
    for contender, size, batch, tap_set in tqdm(points, desc="bench", unit="run"):
        same = [r for r in rows if (r["contender"], r["size"], r["batch"], r["taps"]) == (contender, size, batch, "all")]
        if contender.startswith("release") and same:  # the release computes every tap whatever is asked
            rows.append(dict(same[0], taps=tap_set, note="same run as taps=all: the release always runs the whole U-Net"))
            continue
        row = run_one(args, contender, size, batch, tap_set)
        if row:
            rows.append(row)
            tqdm.write(f"  {contender} {size}px b{batch} {tap_set}: {row['best_seconds']:.2f} s, "
                       f"peak {row['peak_rss_mib'] / 1024:.1f} GiB")
    for earlier in args.merge or []:  # best of several passes: on shared cores one pass is noisy
        keyed = {(r["contender"], r["size"], r["batch"], r["taps"]): r for r in rows}
        for r in json.loads(Path(earlier).read_text())["rows"]:
            key = (r["contender"], r["size"], r["batch"], r["taps"])
            if key not in keyed or r["best_seconds"] < keyed[key]["best_seconds"]:
                keyed[key] = dict(r, merged_from=str(earlier))
        rows = list(keyed.values())
    from _common import cpu_description

    from cleandift_rt.kernels.precision import native_bf16

    cpu = cpu_description()
    print(f"\n{cpu['cpu']}; flags {' '.join(cpu['cpu_flags'])}; native bf16: {'yes' if native_bf16() else 'no'}")
    lines, checks = summarise(rows, native_bf16())
    fast_lines, fast_checks = fast_encoder.ratios(rows, native_bf16())
    lines, checks = lines + fast_lines, checks + fast_checks
    accuracy_lines, accuracy_rows = accuracy(rows)
    fast_accuracy_lines, fast_accuracy_rows = accuracy(rows, fast=True)
    accuracy_lines, accuracy_rows = accuracy_lines + fast_accuracy_lines, accuracy_rows + fast_accuracy_rows
    print("\n".join(lines + accuracy_lines))
    info = build_info()
    result = {"bench": "extract", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), **cpu, "native_bf16": native_bf16(),
                          "torch_cpu_capability": _torch_capability(), "build_info": info},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "ratios": checks, "accuracy": accuracy_rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"extract-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    if args.compare:
        old = {(r["contender"], r["size"], r["batch"], r["taps"]): r for r in json.loads(args.compare.read_text())["rows"]}
        for r in rows:
            key = (r["contender"], r["size"], r["batch"], r["taps"])
            if key in old:
                print(f"  {key}: {old[key]['best_seconds'] / r['best_seconds']:.2f}x vs {args.compare.name}")
    return 0


def _torch_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    sys.exit(main())
