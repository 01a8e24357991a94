"""Shared helpers of the kernel benchmarks (bench/match.py, bench/heads.py): timing, the machine's
measured sgemm throughput, peak extra memory, JSON output."""

from __future__ import annotations

import contextlib
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


SGEMM_SIZE = 2048


def sgemm_fn(size: int = SGEMM_SIZE):
    """torch.mm of two size x size fp32 matrices: the machine's GEMM yardstick. Put it in the same
    compare() round-robin as the kernels, so it sees the same load as they do."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up outside the timings (first-call set-up)
    return lambda: torch.mm(a, b)


def sgemm_gflops(seconds: float, size: int = SGEMM_SIZE) -> float:
    return 2 * size**3 / seconds / 1e9


# CPU flags that decide which kernels (ours, oneDNN's, OpenVINO's) can run: recorded with every result.
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """The CPU's model name and the flags of interest, from /proc/cpuinfo (Linux), else what platform says."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    present = set(value.split())
                    flags = [name for name in FLAGS_OF_INTEREST if name in present]
                    break
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": flags}


def machine() -> dict:
    from cleandift_rt import build_info

    info = build_info()
    return {**cpu_description(), "threads": torch.get_num_threads(), "simd": info.get("simd"),
            "match_cpu_kernel": info.get("match_cpu_kernel"), "cpu_kernel_bf16": info.get("cpu_kernel_bf16"),
            "amx_unavailable": info.get("amx_unavailable"), "cpu_kernel_forced": info.get("cpu_kernel_forced"),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg()}


def print_machine(info: dict) -> None:
    print(f"{info['cpu']}; flags {' '.join(info['cpu_flags']) or '?'}; our kernels: fp32 {info['match_cpu_kernel']}, "
          f"bf16 {info['cpu_kernel_bf16'] or 'none (no native bf16: precision=bf16 runs fp32)'}"
          + (f" (AMX not used: {info['amx_unavailable']})" if info["amx_unavailable"] else "")
          + f"; {info['threads']} threads, load {info['load_average'][0]:.1f}")


# Our bf16 kernels with the build_info()["simd"] feature each needs, best first (the automatic choice).
BF16_KERNELS = (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"))


def other_bf16_kernels(info: dict) -> list[str]:
    """The bf16 kernels this CPU runs besides the automatic one (AMX CPUs: avx512_bf16), to time
    them side by side with CLEANDIFT_CPU_KERNEL."""
    return [name for name, feature in BF16_KERNELS if feature in info["simd"] and name != info["cpu_kernel_bf16"]]


def amx_contender_note(info: dict) -> str:
    """What the AMX contender is here: the automatic bf16 kernel, or why it cannot run."""
    if info["cpu_kernel_bf16"] == "amx":
        return "AMX contender: ours_bf16 runs the AMX kernel"
    return f"AMX contender: not available on this CPU ({info['amx_unavailable']})"


@contextlib.contextmanager
def cpu_kernel(name: str):
    """Our kernels run `name` inside (CLEANDIFT_CPU_KERNEL is read at every call)."""
    old = os.environ.get("CLEANDIFT_CPU_KERNEL")
    os.environ["CLEANDIFT_CPU_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["CLEANDIFT_CPU_KERNEL"]
        else:
            os.environ["CLEANDIFT_CPU_KERNEL"] = old


def with_kernel(name: str, fn):
    """fn, called with our kernels forced to `name`."""
    def call():
        with cpu_kernel(name):
            return fn()
    return call


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
