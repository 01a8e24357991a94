"""Build-time check of a TensorRT plan: its taps against the fp32 graph, per tap, on real photos.

Strong typing keeps the fp32 islands in the graph, but TensorRT's fused regions may still compute
them otherwise (a fused region picks its own internal precision): the plan's outputs are the only
proof. ``verify_plan`` runs the plan and the fp32 reference (ONNX Runtime, on the GPU when its build
offers it) on the bundled photos and returns the smallest cosine per tap; ``build_engine`` writes
them into the plan header as ``verified_cosine`` and refuses a plan below the threshold.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..formats.artifact import ArtifactInfo, read_onnx_info

# fp16 keeps 11 significant bits; a plan whose islands were fused away overflows to Inf/NaN or
# drifts far below these. fp32 plans may use TF32 tensor cores (10-bit mantissa products).
DEFAULT_MIN_COSINE = {"fp16": 0.995, "fp32": 0.999}
VERIFY_PHOTOS = ("cat", "coffee", "astronaut")


class VerificationFailed(RuntimeError):
    """The plan's outputs differ from the fp32 reference beyond the threshold."""


def reference_for(onnx_path: Path, info: ArtifactInfo, reference=None) -> Path:
    """The fp32 graph a plan built from ``onnx_path`` is compared with (checked before any build)."""
    if reference is not None:
        path = Path(reference)
        hint = "pass the fp32 export with --reference FILE, or --no-verify"
    elif info.extra.get("precision", "fp32") == "fp32":
        return Path(onnx_path)  # an fp32 graph is its own reference
    else:
        name = info.extra.get("fp32_reference")
        if not name:
            raise ValueError(f"{onnx_path} names no fp32 reference in its metadata: pass --reference FILE (the fp32 "
                             "export) or --no-verify")
        path = Path(onnx_path).parent / name
        hint = "keep the fp32 export export_onnx.py wrote beside it, pass --reference FILE, or --no-verify"
    if not path.is_file():
        raise ValueError(f"fp32 reference {path} does not exist: {hint}")
    ref_info = read_onnx_info(path)
    if ref_info.extra.get("precision", "fp32") != "fp32":
        raise ValueError(f"reference {path} is a {ref_info.extra['precision']} graph; it must be the fp32 export")
    missing = [t for t in info.tap_names if t not in ref_info.tap_names]
    if missing:
        raise ValueError(f"reference {path} lacks taps {missing} of {onnx_path}")
    return path


def tap_cosines(reference: dict, candidate: dict) -> dict[str, float]:
    """Smallest per-image cosine of each tap (NaN when either side is not finite)."""
    out = {}
    for tap, ref in reference.items():
        a = np.asarray(ref, np.float64).reshape(len(ref), -1)
        b = np.asarray(candidate[tap], np.float64).reshape(len(ref), -1)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            out[tap] = math.nan
            continue
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        out[tap] = round(float(cos.min()), 6)
    return out


def passes(cosines: dict[str, float], threshold: float) -> bool:
    return all(c >= threshold for c in cosines.values())  # NaN fails


def verify_plan(plan: Path, reference: Path, min_cosine: float | None = None, log=print) -> tuple[dict, bool]:
    """({tap: smallest cosine over the photos}, whether every tap reaches the threshold)."""
    from ..assets import load_photo
    from ..runtime.engine import Engine

    engine = Engine(plan, device="cuda")
    precision = "fp16" if engine.info["extra"].get("precision", "fp32") != "fp32" else "fp32"
    threshold = DEFAULT_MIN_COSINE[precision] if min_cosine is None else float(min_cosine)
    photos = [load_photo(p) for p in VERIFY_PHOTOS]
    batch = photos[: engine.max_batch or len(photos)]
    got, size = engine.extract(batch), engine.size
    del engine  # free the GPU memory before the reference runs
    want = Engine(reference, size=size).extract(batch, taps=list(got))
    cosines = tap_cosines(want, got)
    ok = passes(cosines, threshold)
    worst = min(cosines, key=lambda t: cosines[t] if cosines[t] == cosines[t] else -1)
    log(f"verified against {reference.name} on {len(batch)} photos: per-tap cosine >= {cosines[worst]} "
        f"(worst {worst}; threshold {threshold}) -> {'ok' if ok else 'FAILED'}")
    return cosines, ok
