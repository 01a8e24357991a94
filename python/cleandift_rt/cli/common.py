"""Helpers every command shares: engine options, one-line user errors, reading images, writing outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..taps import DEFAULT_TAP, TAPS


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type for counts: argparse then reports a bad value in its usual one-line form."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser, tap: bool = True, engine_required: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", required=engine_required, metavar="FILE",
                   help=".onnx, .plan, or a student .safetensors / diffusers folder (PyTorch backend)")
    g.add_argument("--base", metavar="DIR", help="base SD model (diffusers folder or .safetensors): needed for "
                   "student files; gives the text encoder for prompts")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: the best available)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size for dynamic-size engines and the PyTorch backend (multiples of 64)")
    g.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt", "torch"],
                   help="what runs the engine file (default: chosen from the file; .onnx: ONNX Runtime, or "
                   "OpenVINO for bf16 or when ONNX Runtime is not installed)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fp32 (default, the reference); bf16: native bf16 on CPUs with AVX512_BF16 or AMX "
                   "(OpenVINO for .onnx, autocast for the PyTorch backend; fp32 elsewhere, with a warning); "
                   "fp16: PyTorch backend on CUDA")
    if tap:
        g.add_argument("--tap", default=DEFAULT_TAP, choices=TAPS,
                       help=f"feature tap to use (default {DEFAULT_TAP}, DIFT's choice for correspondence)")


def open_engine(args, taps=None):
    from ..runtime.engine import Engine

    exported = Path(args.engine).suffix in (".onnx", ".plan")  # --base then serves the text encoder only
    kwargs = {"base": None if exported else args.base, "device": args.device, "taps": taps, "backend": args.backend,
              "precision": args.precision}
    if args.size:
        kwargs["size"] = tuple(args.size)
    return Engine(args.engine, **kwargs)


def engine_identity(args, engine) -> str:
    from ..evaluation.runner import file_identity, short_hash

    parts = [file_identity(args.engine), engine.size, engine.resize]
    if args.base:
        parts.append(file_identity(args.base))
    if engine.requested_precision is not None and engine.info["precision"] != "fp32":
        parts.append(engine.info["precision"])  # bf16 / fp16 features are other features; fp32 keeps its caches
    return short_hash(*parts)


def read_image(path: Path):
    from ..features.preprocess import load_image

    try:
        return load_image(path)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def tap_maps(engine, images, tap: str):
    """``[C, h, w]`` float32 tensors of one tap for each PIL image."""
    import torch

    out = []
    for img in images:
        f = engine.extract([img], taps=[tap])[tap]
        out.append(torch.as_tensor(np.asarray(f))[0].float())
    return out


def save_picture(img, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--out {path}: pictures are written as .png (or .jpg / .webp)")
    img.save(path)


def write_json(obj, path: Path) -> None:
    from ..checkpoint import atomic_write_bytes

    payload = json.dumps(obj, indent=2).encode()
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(payload))
