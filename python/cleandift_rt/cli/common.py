"""Helpers every command shares: the argument groups (engine, output, run), one-line user errors,
reading images, writing outputs.

One meaning of each shared flag: ``--size H W`` (one number: a square), ``--device`` defaulting to the
best available device, ``--out`` in the "output" group, ``--seed`` / ``--cache`` / ``--resume`` /
``--no-progress`` / ``--device`` in the "run" group.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from ..taps import DEFAULT_TAP, TAPS

DEVICE_HELP = "cpu, cuda, cuda:N (default: the best available: cuda when PyTorch sees a GPU, else cpu)"
SIZE_HELP = "H W, or one number for a square"


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 2."""


def _whole_number(text: str, low: int, high: int | None, expected: str) -> int:
    """``text`` as an int in [low, high]; anything else an argparse error in its usual one-line form."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts."""
    return _whole_number(text, 1, None, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    """argparse type for counts that may be zero."""
    return _whole_number(text, 0, None, "a whole number >= 0")


def port(text: str) -> int:
    """argparse type for a TCP port."""
    return _whole_number(text, 1, 65535, "a port number 1-65535")


def square_sizes(argv: list[str]) -> list[str]:
    """``--size N`` (or ``--size=N``) written as ``--size N N`` where one number is given; the parser then
    reads exactly two, so arguments after ``--size H W`` or ``--size N`` stay what they are (images,
    key=value overrides)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--size="):
            out += ["--size", token[7:], token[7:]]
        elif token == "--size" and i + 1 < len(argv) and _is_number(argv[i + 1]) and not (
                i + 2 < len(argv) and _is_number(argv[i + 2])):
            out += [token, argv[i + 1], argv[i + 1]]
            i += 1
        else:
            out.append(token)
        i += 1
    return out


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


class Parser(argparse.ArgumentParser):
    """The parser of every command (its subcommands inherit it): one ``--size`` number is a square."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(square_sizes(sys.argv[1:] if args is None else list(args)), namespace)


def add_size_arg(group, help: str, default: int | None = None) -> None:
    """The one ``--size``: ``H W`` pixels, one number for a square (``--size 512`` is ``--size 512 512``;
    the parser must be a :class:`Parser`)."""
    group.add_argument("--size", type=positive_int, nargs=2, metavar=("H", "W"),  # --size 0: an error, not "not given"
                       default=None if default is None else [default, default], help=f"{help} ({SIZE_HELP})")


def square_side(size, command: str) -> int | None:
    """The side of a square ``--size`` for the commands that run square inputs; None when not given."""
    if size is None:
        return None
    height, width = size
    if height != width:
        raise UserError(f"--size {height} {width}: {command} runs square inputs; give one number (--size {height})")
    return height


def best_device(requested: str | None) -> str:
    """``--device`` as given, else the best available device: cuda when PyTorch sees a GPU, else cpu."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_engine_args(p: argparse.ArgumentParser, tap: str | None = DEFAULT_TAP, engine_required: bool = True, *,
                    tap_why: str = "DIFT's choice for correspondence", title: str = "engine",
                    base_help: str | None = None, size_help: str | None = None):
    """The engine group: which file runs, on what and at which size (and ``--tap`` unless ``tap`` is None)."""
    g = p.add_argument_group(title)
    g.add_argument("--engine", required=engine_required, metavar="FILE",
                   help=".onnx, .plan, or a student .safetensors / diffusers folder (PyTorch backend)")
    g.add_argument("--base", metavar="DIR", help=base_help or "base SD model (diffusers folder or .safetensors): "
                   "needed for student files; gives the text encoder for prompts")
    g.add_argument("--device", help=DEVICE_HELP)
    add_size_arg(g, size_help or "input size for dynamic-size engines and the PyTorch backend (multiples of 64)")
    g.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt", "torch"],
                   help="what runs the engine file (default: chosen from the file; .onnx: ONNX Runtime, or "
                   "OpenVINO for bf16 or when ONNX Runtime is not installed)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="fp32: the reference; bf16: native bf16 on CPUs with AVX512_BF16 or AMX (OpenVINO for "
                   ".onnx, autocast for the PyTorch backend; fp32 elsewhere, with a warning); fp16: PyTorch backend "
                   "on CUDA (default: bf16 for .onnx run on a CPU with native bf16, else fp32)")
    if tap is not None:
        g.add_argument("--tap", default=tap, choices=TAPS, help=f"feature tap to use (default {tap}, {tap_why})")
    return g


def add_output_args(p: argparse.ArgumentParser, metavar: str, help: str, required: bool = True):
    """The output group: ``--out`` (a command adds its other outputs, e.g. ``--json``, to the group returned)."""
    g = p.add_argument_group("output")
    g.add_argument("--out", required=required, metavar=metavar, help=help)
    return g


def add_run_args(p: argparse.ArgumentParser, *, seed: str | None = None, seed_default: int | None = 0,
                 cache: str | None = None, cache_metavar: str = "DIR", resume: bool = False, progress: bool = True,
                 device: bool = False):
    """The run group, with the flags a command has: ``--seed`` and ``--cache`` (given their help, which
    says what they seed and cache), ``--resume``, ``--no-progress``, ``--device`` (commands without an
    engine group). The command adds its own run flags to the group returned."""
    g = p.add_argument_group("run")
    if seed is not None:
        g.add_argument("--seed", type=int, default=seed_default, help=seed)
    if cache is not None:
        g.add_argument("--cache", metavar=cache_metavar, help=cache)
    if resume:
        g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    if progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if device:
        g.add_argument("--device", help=DEVICE_HELP)
    return g


def engine_options(args) -> dict:
    """The ``Engine`` keyword arguments the engine group gives (those set), for this process or a Ray worker."""
    exported = Path(args.engine).suffix in (".onnx", ".plan")  # --base then serves the text encoder only
    options = {"base": None if exported else args.base, "device": args.device, "backend": args.backend,
               "precision": args.precision, "size": tuple(args.size) if args.size else None}
    return {k: v for k, v in options.items() if v is not None}


def open_engine(args, taps=None, aggregator=None):
    """The ``Engine`` the engine group names; ``aggregator``: an aggregator file whose "hyper" output it adds."""
    from ..runtime.engine import Engine

    return Engine(args.engine, taps=taps, aggregator=aggregator, **engine_options(args))


def engine_identity(args, engine) -> str:
    from ..checkpoint import file_identity, short_hash

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
