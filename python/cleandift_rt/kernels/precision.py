"""Whether this CPU computes bf16 natively, and the one fallback rule every CPU path follows.

Native bf16 means AVX512_BF16 (``vdpbf16ps``) or AMX-BF16, as the native module detects them at
run time (``CLEANDIFT_DISABLE_SIMD=avx512_bf16,amx`` hides them, to test the fallback). Without
them bf16 is emulated and 2.5-4x slower than fp32 (docs/cpu.md), so asking for bf16 there warns
once per process and runs fp32, which is also the more exact result. ``match`` and ``project``
ask the native module instead (``bf16_kernel``): ``CLEANDIFT_CPU_KERNEL=amx_emulated`` gives them
a bf16 kernel on any CPU (the AMX kernel over emulated tiles, for tests and comparisons).
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch

from ..build_info import native

NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
CPU_PRECISIONS = ("fp32", "bf16")

_warned = False
_warn_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def cpu_feature_names() -> tuple[str, ...]:
    """The SIMD features the native kernels may use here (``build_info()["simd"]``), detected once."""
    try:
        return tuple(native().build_info()["simd"])
    except ImportError:  # no native module: nothing of ours could use them anyway
        return ()


def native_bf16() -> bool:
    """True when the CPU has AVX512_BF16 or AMX-BF16 (and the OS lets us use them)."""
    return any(f in cpu_feature_names() for f in NATIVE_BF16_FEATURES)


def bf16_kernel() -> str | None:
    """The CPU kernel ``match`` / ``project`` run bf16 with now (``"amx"``, ``"avx512_bf16"``, or one
    ``CLEANDIFT_CPU_KERNEL`` names), None where there is none; ``ValueError`` when that variable
    names a kernel this CPU cannot run. Read at every call: the variable may change."""
    return native().cpu_kernel("bfloat16")


def cpu_precision(precision: str, stacklevel: int = 3) -> str:
    """The precision a CPU path runs for ``precision``: bf16 only where it is native, else fp32
    (warning once per process)."""
    global _warned
    if precision != "bf16" or native_bf16():
        return precision
    with _warn_lock:
        first, _warned = not _warned, True
    if first:
        warnings.warn("precision='bf16' asked for, but this CPU has no native bf16 (AVX512_BF16 or AMX): emulated "
                      "bf16 is slower than fp32 here, so fp32 runs instead (info['precision'] says what ran)",
                      RuntimeWarning, stacklevel=stacklevel)
    return "fp32"


def check_precision(precision, allowed=CPU_PRECISIONS) -> None:
    if precision is not None and precision not in allowed:
        raise ValueError(f"precision must be one of {', '.join(map(repr, allowed))} (or None), got {precision!r}")


def kernel_precision(dtype: torch.dtype, precision: str | None, stacklevel: int = 4) -> str:
    """What a CPU kernel multiplies in: the caller's ``precision`` (bf16 only where a bf16 kernel
    runs, ``bf16_kernel``; else fp32 as ``cpu_precision`` says), else bf16 for bf16 inputs where a
    bf16 kernel runs and fp32 otherwise (where bf16 and fp16 inputs are converted exactly, silently:
    nothing was asked for)."""
    check_precision(precision)
    if precision is None:
        return "bf16" if dtype == torch.bfloat16 and bf16_kernel() else "fp32"
    if precision == "bf16" and bf16_kernel():
        return "bf16"
    return cpu_precision(precision, stacklevel=stacklevel)


NATIVE_COMPUTE = {"fp32": "float32", "bf16": "bfloat16"}  # the native module's names
