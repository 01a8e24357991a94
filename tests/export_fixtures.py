"""Test helper: the two tiny ONNX exports shared by the export, engine and TensorRT-host tests.

The fixtures that use it live in conftest.py, so every test module gets the same session-scoped
exports; this module holds what the tests also need by name (sizes, the subset, a cosine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cleandift_rt.export.onnx_export import export_onnx

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
SUBSET = ("us3", "us6")


def _export_cli():
    sys.path.insert(0, str(ROOT / "export"))
    try:
        import export_onnx as cli
    finally:
        sys.path.pop(0)
    return cli


def export_fp16(base_dir: str, student_file: str, out_dir: Path) -> Path:
    """All taps at 128 px, ``--precision fp16`` through the CLI (the fp32 reference lands beside it)."""
    out = out_dir / "tiny16.onnx"
    assert _export_cli().main(["--student", student_file, "--base", base_dir, "--out", str(out), "--size", str(SIZE),
                               str(SIZE), "--batch", "1:2:4", "--precision", "fp16"]) == 0
    return out


def export_both(base_dir: str, student_file: str, out_dir: Path) -> dict[str, Path]:
    """All taps at a fixed 128 px through the CLI, and a two-tap dynamic-size one with external data."""
    cli = _export_cli()
    full, subset = out_dir / "tiny_all.onnx", out_dir / "tiny_sub.onnx"
    assert cli.main(["--student", student_file, "--base", base_dir, "--out", str(full), "--size", str(SIZE), str(SIZE),
                     "--batch", "1:2:4"]) == 0
    export_onnx(student_file, base_dir, subset, dynamic_size=(64, 192), taps=SUBSET, external_data=True,
                log=lambda *_: None)
    return {"full": full, "subset": subset}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per batch item of two feature arrays (float64)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
