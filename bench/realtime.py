"""Real-time numbers for robotics: per-frame latency of a Robot-DIFT package on every CPU path, the tracker's
own cost, and the "latest" policy under a simulated 30 fps camera.

A Robot-DIFT encoder package (models.robot_dift layout) is written from an SD 2.1-size base with random
weights (never downloaded; ``--tiny``: the tiny test model, which checks the script, not the ratios) and
exported to ONNX at 256 px (us3 + us6 + us8) and 512 px (us6). Each contender runs in its own process:

  engine-ort-fp32        the export on ONNX Runtime (the default CPU path)
  engine-openvino-fp32   the export on OpenVINO, fp32
  engine-openvino-bf16   the export on OpenVINO, native bf16 (fp32 with a warning on CPUs without it)
  engine-torch-fp32      the package on the Engine's PyTorch backend (eager, stops after the last tap)
  engine-torch-bf16      the same under CPU bf16 autocast
  robot-dift-fp32        a Robot-DIFT-style eager extractor: the package's math in fp32 PyTorch, hooks on the
                         taps, the forward stopped after the last one it needs (as its CPU code runs)
  release-fp32           a release-style eager extractor: the whole U-Net every frame, hooks on all 11 taps

For each: latency p50 / p95 / p99 and frames/s over ``--frames`` frames, one camera (batch 1) and two
(batch 2). Then, on the fastest engine at 256 px: the tracker's own time per frame (64 and 256 points)
and ``Engine.stream(policy="latest")`` fed by a 30 fps source for ``--source-frames`` frames (latency
distribution, drop rate, growth of the median latency from the first quarter to the last). Targets (issue 27): best engine
>= 5x robot-dift-fp32 at 256 px, tracker <= 5% of the frame time at 256 points, latest-policy p99 <= 2x
the engine's own p99 with no growth.

    python bench/realtime.py --tiny --quick        # checks the script (a minute or two)
    python bench/realtime.py                       # SD 2.1 size: run it on a quiet machine (about an hour)
Writes bench/results/realtime-<time>.json (CPU flags, threads and load included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_machine, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONTENDERS = ("engine-ort-fp32", "engine-openvino-fp32", "engine-openvino-bf16", "engine-torch-fp32",
              "engine-torch-bf16", "robot-dift-fp32", "release-fp32")
POINTS = {256: ("us3", "us6", "us8"), 512: ("us6",)}  # size -> taps
TIMESTEP = 261.0
PROMPT = "insert the pin"


# -- files ---------------------------------------------------------------------------------------


def ensure_model(cache: Path, tiny: bool) -> tuple[Path, Path]:
    """(base folder, Robot-DIFT package folder): random weights of the chosen size, written once."""
    from cleandift_rt.models import load_base, write_random_base, write_tiny_base
    from cleandift_rt.models.robot_dift import save_robot_dift_package
    from cleandift_rt.taps import tap_channels

    base = cache / ("tiny" if tiny else "sd21-random")
    if not (base / "model_index.json").is_file():
        print(f"writing {'tiny' if tiny else 'SD 2.1-size random'} weights to {base} (once)", flush=True)
        (write_tiny_base if tiny else lambda p: write_random_base(p, "sd21"))(base)
    package = cache / f"{base.name}-robot-dift"
    if not (package / "metadata.json").is_file():
        model = load_base(base, text_encoder=False)
        channels = tap_channels(model.block_out_channels)
        save_robot_dift_package(package, model.unet, TIMESTEP, {t: channels[t] for t in ("us3", "us6", "us8", "us10")})
    return base, package


def ensure_onnx(base: Path, package: Path, size: int) -> Path:
    out = package.parent / f"{package.name}-{size}-{'-'.join(POINTS[size])}.onnx"
    if not out.is_file():
        from cleandift_rt.export.onnx_export import export_onnx

        export_onnx(str(package), str(base), out, size=(size, size), taps=list(POINTS[size]))
    return out


# -- the eager peers ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


class RobotDiftStyle:
    """The package's math as Robot-DIFT's CPU code runs it: fp32 eager, hooks, stop after the last tap."""

    def __init__(self, base: Path, package: Path):
        import torch

        from cleandift_rt.models import load_base
        from cleandift_rt.models.robot_dift import load_robot_dift
        from cleandift_rt.taps import TAP_TABLE

        self.torch, self.base = torch, load_base(base)
        self.package = load_robot_dift(package, self.base)
        self.unet, self.captured, self.wanted = self.package.student.unet, {}, ()
        self.embeds = self.base.encode_prompt(PROMPT)
        for name in self.package.feature_dims:
            self.unet.get_submodule(TAP_TABLE[name].module).register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(_module, _inputs, out):
            self.captured[name] = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            if all(t in self.captured for t in self.wanted):
                raise _Stop

        return hook

    def extract(self, pixels, taps):
        torch = self.torch
        self.captured, self.wanted = {}, tuple(taps)
        with torch.no_grad():
            latents = self.base.vae.encode(pixels).latent_dist.mode() * self.base.scaling_factor
            try:
                self.unet(latents, self.package.student.timestep,
                          encoder_hidden_states=self.embeds.expand(len(pixels), -1, -1))
            except _Stop:
                pass
        return {t: self.captured[t].float() for t in taps}


def contender(name: str, base: Path, package: Path, size: int):
    """(run(pixels) -> features, what runs)."""
    import torch

    taps = list(POINTS[size])
    if name.startswith(("engine-ort", "engine-openvino")):
        from cleandift_rt import Engine

        backend = "onnxruntime" if name.startswith("engine-ort") else "openvino"
        precision = None if backend == "onnxruntime" else name.rsplit("-", 1)[1]
        engine = Engine(ensure_onnx(base, package, size), device="cpu", backend=backend, precision=precision)
        embeds = engine_embeds(base)
        return (lambda x: engine.extract(x, prompt_embeds=embeds)), {k: engine.info.get(k) for k in
                                                                     ("backend", "precision", "threads")}
    if name.startswith("engine-torch"):
        from cleandift_rt import Engine

        engine = Engine(package, base=str(base), size=(size, size), taps=taps, precision=name.rsplit("-", 1)[1])
        return (lambda x: engine.extract(x, prompt=PROMPT)), {"backend": "pytorch", "precision": engine.info["precision"]}
    if name == "robot-dift-fp32":
        peer = RobotDiftStyle(base, package)
        return (lambda x: peer.extract(x, taps)), {"precision": "fp32", "threads": torch.get_num_threads()}
    if name == "release-fp32":
        from extract import ReleaseStyleExtractor

        peer = ReleaseStyleExtractor(base, bf16=False)
        return (lambda x: peer.extract(x, taps)), {"precision": "fp32", "threads": torch.get_num_threads()}
    raise SystemExit(f"unknown contender {name}")


def engine_embeds(base: Path):
    from cleandift_rt.models import load_base

    return load_base(base).encode_prompt(PROMPT)[0]


def percentiles(seconds) -> dict:
    import numpy as np

    s = np.asarray(seconds)
    return {"p50_ms": 1000 * float(np.percentile(s, 50)), "p95_ms": 1000 * float(np.percentile(s, 95)),
            "p99_ms": 1000 * float(np.percentile(s, 99)), "mean_ms": 1000 * float(s.mean())}


# -- workers --------------------------------------------------------------------------------------


def worker_latency(args) -> dict:
    import torch

    base, package = Path(args.base), Path(args.package)
    run, detail = contender(args.worker, base, package, args.size)
    rows = []
    for cameras in (1, 2):
        frames = torch.rand(args.frames + 2, cameras, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        frames = frames * 2 - 1
        run(frames[0])
        run(frames[1])  # warm-up: sessions, allocations, oneDNN kernels
        times = []
        for f in frames[2:]:
            t0 = time.perf_counter()
            run(f)
            times.append(time.perf_counter() - t0)
        rows.append({"contender": args.worker, "size": args.size, "taps": list(POINTS[args.size]), "cameras": cameras,
                     "frames": len(times), "fps": cameras * len(times) / sum(times), **percentiles(times), **detail})
    return {"rows": rows}


def worker_tracking(args) -> dict:
    """The tracker's own time per frame on the engine's real maps, and the latest policy under 30 fps."""
    import numpy as np
    import torch

    from cleandift_rt import Engine, Tracker

    base, package = Path(args.base), Path(args.package)
    name = args.worker.split(":", 1)[1]
    engine = Engine(ensure_onnx(base, package, 256), device="cpu", backend="onnxruntime" if "ort" in name else "openvino",
                    precision=None if "ort" in name else name.rsplit("-", 1)[1])
    embeds = engine_embeds(base)
    gen = torch.Generator().manual_seed(0)
    frames = [(torch.rand(256, 256, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(4)]
    out = {"engine": name, "tracker": []}
    for count in (64, 256):
        tracker = Tracker(engine, "us6", prompt_embeds=embeds)
        feats = tracker.features(frames)
        points = np.random.default_rng(count).uniform(4, 251, (count, 2))
        tracker.set_reference(feats[0], points)
        tracker.track(feats[1])  # warm-up
        times = []
        for i in range(args.frames):
            t0 = time.perf_counter()
            tracker.track(feats[1 + i % 3])
            times.append(time.perf_counter() - t0)
        out["tracker"].append({"points": count, **percentiles(times)})
    period, total = 1 / 30, args.source_frames
    own = []
    for f in frames[:3]:
        t0 = time.perf_counter()
        engine.extract([f], prompt_embeds=embeds)
        own.append(time.perf_counter() - t0)

    def camera():
        start = time.perf_counter()
        for i in range(total):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield frames[i % 4]

    results = []
    for r in engine.stream(camera(), taps="us6", policy="latest"):
        results.append((r.index, r.latency, r.inference, r.dropped))
    latency = [lat for _, lat, _, _ in results]
    inference = [inf for _, _, inf, _ in results]
    quarter = max(1, len(latency) // 4)
    out["latest"] = {"source_fps": 30, "source_frames": total, "delivered": len(results),
                     "dropped": int(sum(d for *_, d in results)), "drop_rate": 1 - len(results) / total,
                     "latency": percentiles(latency), "engine_inference": percentiles(inference + own),
                     "first_quarter_p50_ms": percentiles(latency[:quarter])["p50_ms"],
                     "last_quarter_p50_ms": percentiles(latency[-quarter:])["p50_ms"]}
    return out


def run_worker(args, name: str, size: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--base", str(args.base), "--package", str(args.package),
           "--size", str(size), "--frames", str(args.frames), "--source-frames", str(args.source_frames)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {name} at {size} px failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the driver -----------------------------------------------------------------------------------


def summarise(rows, tracking, tiny: bool) -> tuple[list[str], list[dict]]:
    lines, checks = [], []
    for size in sorted({r["size"] for r in rows}):
        for cameras in (1, 2):
            group = sorted((r for r in rows if r["size"] == size and r["cameras"] == cameras), key=lambda r: r["p50_ms"])
            lines.append(f"\n{size} px ({'+'.join(POINTS[size])}), {cameras} camera{'s' if cameras > 1 else ''}:")
            for r in group:
                ran = " ".join(str(r[k]) for k in ("backend", "precision") if r.get(k))
                lines.append(f"  {r['contender']:22s} p50 {r['p50_ms']:8.1f} ms  p95 {r['p95_ms']:8.1f}  p99 "
                             f"{r['p99_ms']:8.1f}  {r['fps']:6.2f} frames/s  [{ran}]")
    one = {r["contender"]: r for r in rows if r["size"] == 256 and r["cameras"] == 1}
    engines = [r for c, r in one.items() if c.startswith("engine")]
    if engines and "robot-dift-fp32" in one:
        best = min(engines, key=lambda r: r["p50_ms"])
        ratio = one["robot-dift-fp32"]["p50_ms"] / best["p50_ms"]
        checks.append({"target": "best engine >= 5x robot-dift-fp32 at 256 px, batch 1", "ours": best["contender"],
                       "ratio": ratio, "met": ratio >= 5.0, "meaningful": not tiny})
    if tracking:
        frame_ms = one.get(tracking["engine"], {}).get("p50_ms")
        for t in tracking["tracker"]:
            lines.append(f"\ntracker, {t['points']} points: p50 {t['p50_ms']:.2f} ms per frame"
                         + (f" = {100 * t['p50_ms'] / frame_ms:.1f}% of {tracking['engine']}'s frame" if frame_ms else ""))
            if t["points"] == 256 and frame_ms:
                share = t["p50_ms"] / frame_ms
                checks.append({"target": "tracker <= 5% of the frame time, 256 points at 256 px", "share": share,
                               "met": share <= 0.05, "meaningful": not tiny})
        lat = tracking["latest"]
        lines.append(f"\nlatest policy, 30 fps source, {lat['source_frames']} frames: delivered {lat['delivered']}, "
                     f"dropped {lat['dropped']} ({100 * lat['drop_rate']:.0f}%); latency p50 {lat['latency']['p50_ms']:.0f} "
                     f"p95 {lat['latency']['p95_ms']:.0f} p99 {lat['latency']['p99_ms']:.0f} ms; engine p99 "
                     f"{lat['engine_inference']['p99_ms']:.0f} ms; median first quarter {lat['first_quarter_p50_ms']:.0f}, "
                     f"last quarter {lat['last_quarter_p50_ms']:.0f} ms")
        ratio = lat["latency"]["p99_ms"] / lat["engine_inference"]["p99_ms"]
        checks.append({"target": "latest: p99 latency <= 2x the engine's p99", "ratio": ratio, "met": ratio <= 2.0,
                       "meaningful": True})
        growth = lat["last_quarter_p50_ms"] / lat["first_quarter_p50_ms"]
        checks.append({"target": "latest: no growth (median latency, last quarter <= 1.5x first)", "ratio": growth,
                       "met": growth <= 1.5, "meaningful": True})
    for c in checks:
        value = c.get("ratio", c.get("share"))
        lines.append(f"  {c['target']}: {value:.3f} -> {'met' if c['met'] else 'MISSED'}"
                     + ("" if c["meaningful"] else " (tiny model: says nothing about SD 2.1 size)"))
    return lines, checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny test model (checks the script; its ratios mean nothing)")
    p.add_argument("--quick", action="store_true", help="10 frames per point, 300 source frames, 256 px only")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--frames", type=int, default=30, help="timed frames per point")
    p.add_argument("--source-frames", type=int, default=1000, help="frames of the simulated 30 fps camera")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache", help="random weights, packages, exports")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--package", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "export":  # in its own process, so that no contender's memory includes it
        print(json.dumps({"onnx": str(ensure_onnx(args.base, args.package, args.size))}))
        return 0
    if args.worker:
        print(json.dumps(worker_tracking(args) if args.worker.startswith("tracking:") else worker_latency(args)))
        return 0
    if args.quick:
        args.frames, args.source_frames = min(args.frames, 10), min(args.source_frames, 300)
    sizes = (256,) if args.quick else (256, 512)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.base, args.package = ensure_model(args.cache, args.tiny)
    for size in sizes:  # exports before any timing
        if any(c.startswith(("engine-ort", "engine-openvino")) for c in args.contenders) and \
                run_worker(args, "export", size) is None:
            return 1
    from tqdm import tqdm

    info = machine()
    print_machine(info)
    rows = []
    for name, size in tqdm([(c, s) for s in sizes for c in args.contenders], desc="realtime", unit="run"):
        got = run_worker(args, name, size)
        rows += got["rows"] if got else []
    engines = [r for r in rows if r["contender"].startswith(("engine-ort", "engine-openvino"))
               and r["size"] == 256 and r["cameras"] == 1]
    tracking = None
    if engines:
        best = min(engines, key=lambda r: r["p50_ms"])["contender"]
        tracking = run_worker(args, f"tracking:{best}", 256)
    lines, checks = summarise(rows, tracking, args.tiny)
    print("\n".join(lines))
    path = write_json("realtime", {"bench": "realtime", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "model": "tiny" if args.tiny else "sd21-random", "machine": info,
                                   "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                   "rows": rows, "tracking": tracking, "targets": checks})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
