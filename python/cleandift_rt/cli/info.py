"""``cleandift-rt info | build-info``: what a file holds, and what this installation has.

``info`` asks the kind of the file for its description: each kind in :data:`FILE_KINDS` says which
files it claims, how it describes one (a plain dict, also the ``--json`` output), how that dict reads
as text and, where the kind has one, which picture ``--out`` writes. The kinds claim disjoint sets of
files, so their order does not matter; a new kind of file is one more entry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..formats.quantized import describe_int8
from .common import UserError, save_picture

ENGINE_SUFFIXES = (".onnx", ".plan")


@dataclass(frozen=True)
class FileKind:
    """One kind of file ``info`` reads."""

    name: str
    claims: Callable[[Path], bool]  # is this file of the kind? (no two kinds claim the same file)
    describe: Callable[[Path], dict]  # what it holds, JSON-serialisable
    format: Callable[[dict], str]  # the description as text
    picture: Callable[[Path, Path], None] | None = None  # write the kind's picture (``--out``) of a file


def format_info(d: dict) -> str:
    """An engine or student file's description (``formats.artifact.describe``) as text."""
    lines = [f"{d.get('path', '')}  [{d.get('kind', '?')}]"]
    if "taps" in d:
        lines.append("  taps: " + ", ".join(f"{t['name']} ({t['channels']} ch, /{t['stride']})" for t in d["taps"]))
    for key, label in (("default_size", "input size (H, W)"), ("size_range", "dynamic size range"), ("resize", "resize"),
                       ("batch", "batch"), ("base_model", "base model"), ("variant", "variant"), ("student", "student"),
                       ("prompt", "baked prompt"), ("timestep", "timestep"), ("native_size", "native size"),
                       ("text_conditioning", "text conditioning"), ("head_conditioning", "projection heads"),
                       ("package_version", "written by cleandift-rt"), ("file_bytes", "file bytes"),
                       ("external_data", "external data"), ("tensorrt", "TensorRT"), ("note", "note")):
        if d.get(key) not in (None, [], {}):
            lines.append(f"  {label}: {d[key]!r}" if key == "prompt" else f"  {label}: {d[key]}")
    if "text_conditioning" in d and d["text_conditioning"] is None:
        lines.append("  text conditioning: not recorded (the public release's students trained with captions)")
    if d.get("kind") in ("onnx", "tensorrt") or "encoder" in d:  # an engine file, or an Engine's info
        lines.append("  encoder: " + format_encoder_record(d.get("encoder")))
    if d.get("adapted_encoder"):
        adapted = d["adapted_encoder"]
        lines.append(f"  adapted to encoder: {adapted['name']} (hash {adapted['hash']}); run it with that encoder")
    build = d.get("build") or {}
    if build:  # a TensorRT plan's build summary
        capability = ".".join(map(str, build.get("gpu_capability", []))) or "?"
        parts = [f"{build.get('gpu_name', '?')} (compute {capability})", "fp16" if build.get("fp16") else "fp32"]
        if "engine_layers" in build:
            parts.append(f"{build['engine_layers']} layers")
        if build.get("precision_mix"):
            parts.append("precision " + ", ".join(f"{k} {v}" for k, v in sorted(build["precision_mix"].items())))
        if "build_seconds" in build:
            parts.append(f"built in {build['build_seconds']:.0f} s")
        lines.append("  built for: " + "; ".join(parts))
    hyper = (d.get("extra") or {}).get("hyper")
    if hyper:  # an export with an aggregator's output beside its taps
        lines.append(f"  hyper: {hyper['channels']} ch, /{hyper['stride']}, the {hyper.get('source', '?')} aggregator "
                     f"{hyper.get('aggregator', '')} over {', '.join(hyper.get('layers', []))} at timesteps "
                     f"{', '.join(f'{t:g}' for t in hyper.get('timesteps', []))}")
    extra = d.get("extra") or {}
    if extra.get("precision", "fp32") != "fp32":  # an fp16 or int8 export, or a plan
        reference = f" (from the fp32 graph {extra['fp32_reference']})" if extra.get("fp32_reference") else ""
        lines.append(f"  precision: {extra['precision']}{reference}")
    if extra.get("int8"):
        lines.extend(describe_int8(extra["int8"]))
    lines.extend(f"  WARNING: {w}" for w in d.get("warnings", []))
    return "\n".join(lines)


def format_encoder_record(record: dict | None) -> str:
    """Which encoder gives an engine its latents: the base VAE's or a fast encoder, by name and hash."""
    if record is None:
        return "the base model's VAE encoder (posterior mean x scaling factor)"
    error = record.get("val_latent_error")
    return (f"fast encoder {record['name']} ({record['architecture']}, {record['parameters']:,} parameters, hash "
            f"{record['hash']})" + (f", held-out latent error {error:.4g}" if error is not None else ""))


def format_fast_encoder(d: dict) -> str:
    """A fast-encoder folder's record (``cleandift_encoder.json``) as text."""
    base, training = d.get("base") or {}, d.get("training") or {}
    error = training.get("val_latent_error") or {}
    lines = [f"{d.get('path', '')}  [fast encoder, {d.get('architecture', '?')}]",
             f"  hash: {d.get('hash')}",
             f"  imitates: the VAE of {base.get('name', '?')} (hash {base.get('vae_hash', '?')}, scaling factor "
             f"{base.get('scaling_factor', '?')}, {base.get('latent_channels', '?')} latent channels)",
             f"  started from: {(d.get('init') or {}).get('name') or 'a new encoder'}"]
    if training:
        lines.append(f"  trained: {training.get('steps')} steps on {training.get('training_images')} images, "
                     f"{training.get('crop')} px crops of {training.get('size')} px, loss {training.get('loss')}")
    if error:
        start = f"{error['initial']:.5f} -> " if error.get("initial") is not None else ""
        lines.append(f"  held-out latent error: {start}{error.get('final'):.5f} on {training.get('held_out_images')} "
                     "images (0: the VAE's latents exactly; 1: no better than all-zero latents)")
    return "\n".join(lines)


def format_aggregator(d: dict) -> str:
    """An aggregator file's description (``Aggregator.describe``) as text."""
    lines = [f"{d.get('path', '')}  [aggregator, source {d['source']}]",
             f"  layers: {', '.join(f'{n} ({c} ch)' for n, c in zip(d['layers'], d['channels']))}",
             f"  timesteps: {', '.join(f'{t:g}' for t in d['timesteps'])}",
             f"  descriptor: {d['projection_dim']} channels at 1/{d['output_stride']} of the input; "
             f"{d['parameters']} parameters" + (" (+ the projection heads)" if d["heads"] else "")]
    for key, label in (("steps", "trained steps"), ("val_pck", "val PCK@0.1 bbox"), ("engine", "engine"),
                       ("base", "base model"), ("heads_file", "heads from"), ("size", "input size")):
        if d.get(key) not in (None, "", []):
            value = f"{100 * d[key]:.2f}%" if key == "val_pck" else d[key]
            lines.append(f"  {label}: {value}")
    return "\n".join(lines)


def _describe_file(path: Path) -> dict:
    from ..formats.artifact import describe

    return describe(path)


def _is_aggregator(path: Path) -> bool:
    from ..hyper.aggregator import is_aggregator_file

    return is_aggregator_file(path)


def _describe_aggregator(path: Path) -> dict:
    from ..hyper.aggregator import Aggregator

    aggregator = Aggregator.from_file(path)
    return {"path": str(path), **aggregator.describe(), "mixing_weights": aggregator.mixing_weights().round(6).tolist()}


def _is_fast_encoder(path: Path) -> bool:
    from ..models.fast_encoder import is_fast_encoder_folder

    return is_fast_encoder_folder(path)


def _describe_fast_encoder(path: Path) -> dict:
    from ..models.fast_encoder import read_record

    return {"path": str(path), **read_record(path)}


def _mixing_weights_picture(path: Path, out: Path) -> None:
    from ..hyper.aggregator import Aggregator
    from ..hyper.picture import mixing_weights_picture

    aggregator = Aggregator.from_file(path)
    save_picture(mixing_weights_picture(aggregator.mixing_weights(), aggregator.layers, aggregator.timesteps,
                                        f"{aggregator.source}: mixing weights ({path.name})"), out)


FILE_KINDS = (
    FileKind("engine", lambda path: path.suffix in ENGINE_SUFFIXES, _describe_file, format_info),
    FileKind("aggregator", _is_aggregator, _describe_aggregator, format_aggregator, _mixing_weights_picture),
    FileKind("fast encoder", _is_fast_encoder, _describe_fast_encoder, format_fast_encoder),
    # student .safetensors files and diffusers folders; describe names what it cannot read
    FileKind("student", lambda path: path.suffix not in ENGINE_SUFFIXES and not _is_aggregator(path)
             and not _is_fast_encoder(path), _describe_file, format_info),
)


def kind_of(path: Path) -> FileKind:
    """The kind that claims ``path`` (the student kind claims whatever the others do not)."""
    return next(kind for kind in FILE_KINDS if kind.claims(path))


def cmd_info(args) -> int:
    path = Path(args.file)
    kind = kind_of(path)
    if args.out and kind.picture is None:
        raise UserError(f"--out writes the picture of a file that has one (an aggregator file's mixing weights); "
                        f"{args.file} is not one")
    d = kind.describe(path)
    d.setdefault("path", str(args.file))
    if args.out:
        kind.picture(path, Path(args.out))
        d["picture"] = str(args.out)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(kind.format(d) + (f"\n  picture: {args.out}" if args.out else ""))
    return 0


def cmd_build_info(args) -> int:
    from ..build_info import build_info, format_build_info

    print(json.dumps(build_info(), indent=2) if args.json else format_build_info())
    return 0


def register(sub) -> None:
    """Add the 'info' and 'build-info' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("info", formatter_class=fmt, help="what an engine, student, aggregator or fast-encoder file "
                       "holds",
                       description="Taps, input size, resize policy, prompt, base model and version of an exported "
                       "engine (and which encoder gives its latents), the U-Net facts of a student file (and the "
                       "fast encoder it was adapted to). Reads metadata only (fast, no GPU). A fast-encoder folder "
                       "(distill-encoder) gives the VAE it imitates and its held-out latent error. An "
                       "aggregator.safetensors (train-aggregator) gives its source, layers, timesteps and mixing "
                       "weights, and --out draws them.\n\nexamples:\n  cleandift-rt info sd21.onnx\n"
                       "  cleandift-rt info runs/hyper/aggregator.safetensors --out weights.png")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", metavar="weights.png", help="aggregator files: write the mixing weights as a "
                   "layers x timesteps heat map")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build-info", help="native build, SIMD, CUDA, ONNX Runtime, TensorRT of this install")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_build_info)
