"""Test helper: the two tiny ONNX exports shared by the export, engine and TensorRT-host tests.

The fixtures that use it live in conftest.py, so every test module gets the same session-scoped
exports; this module holds what the tests also need by name (sizes, the subset, a cosine, a
derived output that belongs to no paper system).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cleandift_rt.export.onnx_export import export_onnx
from cleandift_rt.formats.derived import DerivedExport

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


class MixedTaps(torch.nn.Module):
    """A derived output of the tiny model that no paper defines: us3 brought to us6's grid, stacked with
    us6, a 1 x 1 convolution to 8 channels (stride 16). Only what ``formats.derived`` asks for."""

    name, reads, channels, stride = "mixed", ("us3", "us6"), 8, 16

    def __init__(self, seed: int = 0):
        super().__init__()
        self.proj = torch.nn.Conv2d(128, self.channels, 1)  # the tiny model's us3 and us6 have 64 channels each
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) * 0.1)

    def forward(self, taps):
        coarse = torch.nn.functional.interpolate(taps["us3"], scale_factor=2.0, mode="nearest")  # stride 32 -> 16
        return self.proj(torch.cat([coarse, taps["us6"]], dim=1))

    def describe(self) -> dict:
        return {"kind": "us3 and us6, 1 x 1 convolution", "in_channels": self.proj.in_channels}

    def for_export(self, tap_channels) -> DerivedExport:
        if tap_channels["us3"] + tap_channels["us6"] != self.proj.in_channels:
            raise ValueError(f"mixed: made for {self.proj.in_channels} input channels")
        return DerivedExport(self.cpu().eval(), self.describe())
