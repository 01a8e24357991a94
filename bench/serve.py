"""Serving throughput and latency: `cleandift-rt serve` (PyTriton, loopback only) at concurrency 1, 4 and
16, with and without dynamic batching, beside the in-process Engine on the same images.

Each point is a closed loop: C client threads (one cleandift_rt.serving.Client each), every request one
image, the next sent when the answer is in; a point ends after --requests answers or --seconds,
whichever comes first (warm-up requests are not counted). The in-process Engine runs the same images
from this process, one at a time and in batches of the server's maximum batch. Images are the bundled
photos resized to the model's size (so the server's resize costs next to nothing, as for the Engine).
The server runs from the server environment (CLEANDIFT_SERVE_PYTHON, else `cleandift-rt serve-env`'s
cached one, built on first use); clients and the Engine run here.

    python bench/serve.py --quick                 # tiny model at 128 px, us6 (a few minutes on 2 cores)
    python bench/serve.py --model sd21 --requests 16 --seconds 600   # SD2.1-size random weights at 512 px
Writes bench/results/serve-<time>.json. Targets (issue 32): with dynamic batching at concurrency 16 at
least 0.85 of the in-process Engine's throughput; p99 at most 3x p50 at concurrency 4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, cpu_description, write_json  # noqa: E402

CONCURRENCY = (1, 4, 16)
MODELS = {"tiny": 128, "sd21": 512}
TAP = "us6"


def ensure_engine(model: str, cache: Path) -> Path:
    """The model exported once to ONNX with the us6 tap (bench/extract.py's cache)."""
    from extract import ensure_model, ensure_onnx

    return ensure_onnx(ensure_model(model, cache), cache, MODELS[model], [TAP])


def bench_images(size: int, count: int = 8) -> list[np.ndarray]:
    from PIL import Image

    from cleandift_rt.assets import PHOTOS, load_photo

    photos = [load_photo(name) for name in sorted(PHOTOS)]
    out = []
    for i in range(count):  # photos, then their mirror images: distinct inputs
        img = photos[i % len(photos)].resize((size, size), Image.BICUBIC)
        out.append(np.asarray(img if i < len(photos) else img.transpose(Image.FLIP_LEFT_RIGHT)))
    return out


def server_python() -> str:
    named = os.environ.get("CLEANDIFT_SERVE_PYTHON")
    if named:
        return named
    from cleandift_rt.serving.environment import default_layered_dir, layered_env

    return str(layered_env(default_layered_dir()))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Server:
    """`cleandift-rt serve` on loopback ports, stopped with SIGTERM (killed if it does not stop)."""

    def __init__(self, python: str, engine: Path, size: int, max_batch: int, dynamic: bool, queue_delay_us: int,
                 log: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        argv = [python, "-m", "cleandift_rt.cli", "serve", "--engine", str(engine), "--size", str(size),
                "--max-batch", str(max_batch), "--queue-delay-us", str(queue_delay_us), "--host", "127.0.0.1",
                "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        if not dynamic:
            argv.append("--no-dynamic-batching")
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while "serve: ready" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; its log ({self.log}) ends:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.2)

    def stop(self) -> float:
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return time.monotonic() - start


def percentiles(latencies: list[float]) -> dict:
    values = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p99_ms": round(float(np.percentile(values, 99)), 2)}


def closed_loop(call, images: list[np.ndarray], concurrency: int, requests: int, seconds: float,
                make_state=lambda: None) -> dict:
    """``call(state, image)`` from ``concurrency`` threads until ``requests`` answers or ``seconds``."""
    lock, latencies, errors = threading.Lock(), [], []
    taken = [0]
    deadline = time.monotonic() + seconds

    def worker():
        state = make_state()
        while True:
            with lock:
                if taken[0] >= requests or time.monotonic() > deadline:
                    return
                k = taken[0]
                taken[0] += 1
            t0 = time.perf_counter()
            try:
                call(state, images[k % len(images)])
            except Exception as exc:  # counted and reported: a benchmark keeps going
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    row = {"concurrency": concurrency, "answered": len(latencies), "errors": len(errors),
           "seconds": round(elapsed, 3), "images_per_s": round(len(latencies) / elapsed, 3) if latencies else 0.0}
    if latencies:
        row.update(percentiles(latencies))
    if errors:
        row["first_error"] = errors[0][:300]
    return row


def served_points(server: Server, images, requests: int, seconds: float, protocol: str) -> list[dict]:
    from cleandift_rt.serving import Client

    port = server.grpc if protocol == "grpc" else server.http
    url = f"127.0.0.1:{port}"

    def make_client():
        return Client(url, protocol=protocol, timeout=max(seconds, 60))

    warm = make_client()
    for img in images[:4]:
        warm.extract([img], taps=TAP)
    warm.close()
    rows = []
    for c in CONCURRENCY:
        row = closed_loop(lambda client, img: client.extract([img], taps=TAP), images, c, requests, seconds,
                          make_state=make_client)
        rows.append(row)
        print(f"  concurrency {c:2d}: {row['images_per_s']:.2f} img/s, p50 {row.get('p50_ms', 0):.1f} ms, "
              f"p99 {row.get('p99_ms', 0):.1f} ms ({row['answered']} answered, {row['errors']} errors)", flush=True)
    return rows


def engine_points(engine_path: Path, size: int, images, requests: int, seconds: float, max_batch: int) -> dict:
    from cleandift_rt import Engine

    engine = Engine(engine_path, size=(size, size))
    for img in images[:4]:
        engine.extract([img], taps=TAP)
    one = closed_loop(lambda _, img: engine.extract([img], taps=TAP), images, 1, requests, seconds)
    batches = [np.stack([images[(i + j) % len(images)] for j in range(max_batch)])
               for i in range(0, max(requests, max_batch), max_batch)]
    batched = closed_loop(lambda _, batch: engine.extract(batch, taps=TAP), batches, 1,
                          max(1, requests // max_batch), seconds)
    batched["images_per_s"] = round(batched["images_per_s"] * max_batch, 3)
    batched["batch"] = max_batch
    return {"batch_1": one, f"batch_{max_batch}": batched, "backend": engine.info.get("backend"),
            "best_images_per_s": max(one["images_per_s"], batched["images_per_s"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 48 requests and 60 s per point")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--requests", type=int, default=None, help="answers per point (default 48 quick, 160)")
    p.add_argument("--seconds", type=float, default=None, help="time limit per point (default 60 quick, 300)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's batch (and the Engine's batched run)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batcher's queue delay")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--cache", type=Path, default=RESULTS / "cache", help="random weights and exported models")
    args = p.parse_args(argv)
    requests = args.requests or (48 if args.quick else 160)
    seconds = args.seconds or (60.0 if args.quick else 300.0)
    size = MODELS[args.model]
    engine_path = ensure_engine(args.model, args.cache)
    images = bench_images(size)
    python = server_python()
    print(f"model {args.model} at {size} px ({engine_path.name}), tap {TAP}; {requests} requests / {seconds:.0f} s "
          f"per point; server Python {python}", flush=True)

    print("in-process Engine:", flush=True)
    engine = engine_points(engine_path, size, images, requests, seconds, args.max_batch)
    print(f"  batch 1: {engine['batch_1']['images_per_s']:.2f} img/s, p50 {engine['batch_1']['p50_ms']:.1f} ms; "
          f"batch {args.max_batch}: {engine[f'batch_{args.max_batch}']['images_per_s']:.2f} img/s", flush=True)
    served = {}
    for mode, dynamic in (("dynamic_batching", True), ("no_batching", False)):
        print(f"served, {mode.replace('_', ' ')} ({args.protocol}):", flush=True)
        server = Server(python, engine_path, size, args.max_batch, dynamic, args.queue_delay_us,
                        Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log")
        try:
            t0 = time.monotonic()
            server.wait_ready()
            ready_s = time.monotonic() - t0
            rows = served_points(server, images, requests, seconds, args.protocol)
        finally:
            stop_s = server.stop()
        served[mode] = {"rows": rows, "ready_s": round(ready_s, 1), "stop_s": round(stop_s, 1)}
        shutil.rmtree(server.log.parent, ignore_errors=True)

    dyn = {r["concurrency"]: r for r in served["dynamic_batching"]["rows"]}
    best = engine["best_images_per_s"]
    targets = {
        "c16_throughput_ratio": {"value": round(dyn[16]["images_per_s"] / best, 3) if best else None, "target": 0.85},
        "c4_p99_over_p50": {"value": round(dyn[4]["p99_ms"] / dyn[4]["p50_ms"], 2) if dyn[4].get("p50_ms")
                            else None, "target": 3.0, "at_most": True},
    }
    for name, t in targets.items():
        at_most = t.get("at_most", False)
        t["met"] = t["value"] is not None and (t["value"] <= t["target"] if at_most else t["value"] >= t["target"])
        print(f"{name}: {t['value']} (target {'<=' if at_most else '>='} {t['target']}: "
              f"{'met' if t['met'] else 'missed'})", flush=True)
    path = write_json("serve", {"model": args.model, "size": size, "tap": TAP, "engine": engine_path.name,
                                "requests_per_point": requests, "seconds_per_point": seconds,
                                "max_batch": args.max_batch, "queue_delay_us": args.queue_delay_us,
                                "protocol": args.protocol, "engine_in_process": engine, "served": served,
                                "targets": targets, "machine": {**cpu_description(), "load_average": os.getloadavg()}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
