"""Shared helpers of the kernel benchmarks (bench/match.py, bench/heads.py): timing, the machine's
measured sgemm throughput, peak extra memory, JSON output."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim_heap():
    """Give freed heap memory back to the OS, so memory reused from an earlier call shows up again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS above the level at entry, sampled every millisecond (native allocations included;
    the heap is trimmed first so buffers recycled from earlier calls count)."""

    def __enter__(self):
        gc.collect()
        _trim_heap()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra_mb = (self.peak - self.base) / 2**20


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(best seconds over `repeats` after one warm-up call, peak extra MB of one call, last result);
    repeats = 0 times the warm-up call itself (for configs that take tens of seconds)."""
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        result = fn()
    best = time.perf_counter() - t0 if repeats == 0 else float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, mem.extra_mb, result


def compare(fns: dict, repeats: int) -> dict:
    """{name: (best seconds, peak extra MB, result)}: one memory-measured warm-up call per method,
    then `repeats` rounds calling every method in turn (round-robin: on shared cores, load changes
    hit all methods alike instead of whichever ran during a busy second). repeats = 0 times the
    warm-up calls themselves."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            result = fn()
        out[name] = [time.perf_counter() - t0 if repeats == 0 else float("inf"), mem.extra_mb, result]
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name][2] = fn()
            out[name][0] = min(out[name][0], time.perf_counter() - t0)
    return {name: tuple(v) for name, v in out.items()}


def sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM throughput now (torch.mm, size^3), the yardstick of the targets."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds, _, _ = timed(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def machine() -> dict:
    from cleandift_rt import build_info

    info = build_info()
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "simd": info.get("simd"), "match_cpu_kernel": info.get("match_cpu_kernel"),
            "torch": torch.__version__, "load_average": os.getloadavg()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
