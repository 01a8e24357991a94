"""``cleandift-rt train-aggregator`` and the aggregator case of ``cleandift-rt info``: Diffusion Hyperfeatures.

Also what the evaluation and match commands need to use a trained aggregator: the SPair
validator of training (:func:`spair_validator`, PCK@0.1 bbox per point, SPEC section 6) and
:func:`hyper_source` (``--aggregator FILE`` as a feature source of ``evaluation.runner.evaluate``,
whose ``features(image)`` also gives ``match`` its descriptor maps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from collections.abc import Iterable

import numpy as np

from .common import UserError, positive_int, save_picture
from ..taps import TAPS

DEFAULT_SIZE = 512  # the recipe's input size (SPEC section 8)

TRAIN_EXAMPLE = """\
examples:
  # CleanDIFT taps from one pass (the CleanDIFT row); a CPU smoke run of 20 pairs
  cleandift-rt train-aggregator --root SPair-71k --source cleandift --engine sd15_unet.safetensors \\
      --base sd15/ --cache runs/features --out runs/hyper --steps 20
  # the same pass, every tap through the release heads at 11 timesteps (shares the first run's cache)
  cleandift-rt train-aggregator --root SPair-71k --source cleandift-heads --engine sd15_unet.safetensors \\
      --base sd15/ --heads sd15_full.safetensors --cache runs/features --out runs/hyper-heads
  # the original: 50-step DDIM inversion of the base model, 11 steps kept (a GPU job; --cache none
  # recomputes instead of storing ~171 MB per image)
  cleandift-rt train-aggregator --root SPair-71k --source inversion --base sd15/ --out runs/hyper-inv
  # then: cleandift-rt info runs/hyper/aggregator.safetensors --out weights.png
The recipe: 5000 random trn pairs, AdamW 1e-3, validation PCK@0.1 (bbox, per point) on min(360, steps // 10)
val pairs at step 0, every 1000 steps and at the end; metrics in OUT/metrics.jsonl."""


def spair_validator(items: Iterable, alpha: float = 0.1) -> float:
    """PCK@alpha bbox per point (a fraction) of ``(ValItem, source map, target map)`` triples.

    Each source keypoint goes to the target pixel of highest cosine similarity of the descriptor
    maps upsampled bilinearly to the image sizes (``evaluation.transfer``, closed form); correct
    when within ``alpha * max(bbox_w, bbox_h)`` (``evaluation.pck``, DIFT's ``<=``).
    """
    from ..evaluation.pck import PairResult, alpha_key, bbox_size, summarize
    from ..evaluation.transfer import transfer_points

    results = []
    for item, source, target in items:
        if item.target_bbox is None:
            continue
        pred, _ = transfer_points(source, target, item.source_size, item.target_size, item.source_points,
                                  method="analytic")
        distances = np.linalg.norm(pred - item.target_points, axis=1)
        results.append(PairResult(item.pair_id, item.category, distances, bbox_size(item.target_bbox),
                                  float(max(item.target_size))))
    if not results:
        raise ValueError("no validation pair has a target bounding box: PCK@bbox is undefined")
    return summarize(results, alphas=(alpha,))["pck"]["bbox"][alpha_key(alpha)]["point"] / 100


def _open_engine(args, source: str):
    from .common import engine_identity, open_engine
    from ..hyper.sources import EngineTaps

    if not args.engine:
        raise UserError(f"--source {source} runs the CleanDIFT student: pass --engine FILE (an .onnx / .plan export or "
                        "a student .safetensors with --base)")
    if args.size is None and Path(args.engine).suffix not in (".onnx", ".plan"):
        args.size = [DEFAULT_SIZE, DEFAULT_SIZE]  # the PyTorch backend runs the recipe's size
    engine = open_engine(args)
    return EngineTaps(engine, engine_identity(args, engine), args.layers)


def _heads(args, layers):
    from ..models.heads import ProjectionHeads

    if not args.heads:
        raise UserError("--source cleandift-heads projects the taps through the release heads: pass --heads FILE "
                        "(the student's _full .safetensors file)")
    heads = ProjectionHeads.from_release(args.heads)
    missing = [t for t in layers if t not in heads.taps]
    if missing:
        raise UserError(f"{args.heads} has no heads for {missing} (it covers {', '.join(heads.taps)})")
    keep = {k: v for k, v in heads.state_dict().items()
            if not k.startswith("adapters.") or k.split(".")[1] in layers}
    return ProjectionHeads.from_state_dict(keep, str(args.heads)).eval()


def _stored_source(args):
    """(stored source, heads or None, info) from the flags, every check before a model loads."""
    from ..hyper.inversion import InversionExtractor, InversionSettings
    from ..hyper.sources import InversionTaps
    from ..checkpoint import file_identity
    from ..models import load_base

    source = args.source
    if source in ("cleandift", "cleandift-heads"):
        if source == "cleandift" and args.heads:
            raise UserError("--heads applies to --source cleandift-heads only")
        stored = _open_engine(args, source)
        heads = _heads(args, stored.layers) if source == "cleandift-heads" else None
        return stored, heads, {"heads_file": Path(args.heads).name} if heads is not None else {}
    if args.engine or args.heads:
        raise UserError(f"--source {source} runs the base model's own U-Net: pass --base DIR and no --engine / --heads")
    if not args.base:
        raise UserError(f"--source {source} needs --base DIR (the SD base model it inverts)")
    side = (args.size or [DEFAULT_SIZE])[0]
    if args.size and args.size[0] != args.size[1]:
        raise UserError("--source inversion / one-step run square inputs: give --size N N")
    settings = (InversionSettings.one_step(size=side, seed=args.seed) if source == "one-step" else
                InversionSettings(steps=args.inversion_steps, saved=args.saved_steps, size=side, seed=args.seed))
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base(args.base, device=device)
    extractor = InversionExtractor(base, settings, args.layers)
    return InversionTaps(extractor, file_identity(args.base)), None, {}


def cmd_train_aggregator(args) -> int:
    import torch

    from ..evaluation.spair import load_spair
    from ..hyper.sources import head_timesteps, new_aggregator
    from ..hyper.train import HyperTrainConfig, HyperTrainer

    if args.timesteps is not None and args.source != "cleandift-heads":
        raise UserError("--timesteps sets the heads' timesteps of --source cleandift-heads")
    config = HyperTrainConfig(steps=args.steps, lr=args.lr, val_pairs=args.val_pairs, validate_every=args.validate_every,
                              checkpoint_every=args.checkpoint_every, seed=args.seed).check()
    pairs, skips = load_spair(args.root, args.split, categories=args.categories)
    for line in skips.lines():
        print(f"note: {line}")
    val_pairs = load_spair(args.root, args.val_split, categories=args.categories)[0] if config.validation_pairs else []
    stored, heads, info = _stored_source(args)
    torch.manual_seed(args.seed)  # the network's initial weights
    timesteps = head_timesteps(args.timesteps or 11) if args.source == "cleandift-heads" else None
    aggregator = new_aggregator(args.source, stored, heads, timesteps, args.projection_dim, args.output_stride, info)
    cache = None if args.cache == "none" else (args.cache or "auto")
    trainer = HyperTrainer(aggregator, stored, pairs, args.out, config, val_pairs=val_pairs, validator=spair_validator,
                           cache_dir=cache, resume=args.resume, progress=not args.no_progress, device=args.device)
    summary = trainer.run()
    pck = summary["val_pck"]
    loss = summary["final_loss"]
    print(f"{args.source}: {summary['steps']} steps" + (f", last loss {loss:.4f}" if loss is not None else "")
          + (f", val PCK@0.1 bbox {100 * pck:.2f}%" if pck is not None else "")
          + f"; evaluate with: cleandift-rt eval-spair --root {args.root} ... --aggregator {summary['file']}")
    return 0


def format_aggregator(d: dict) -> str:
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


def cmd_info_aggregator(args) -> int:
    """``info`` on an aggregator file: its shape and source, and with ``--out`` the heat map."""
    from ..hyper.aggregator import Aggregator
    from ..hyper.picture import mixing_weights_picture

    aggregator = Aggregator.from_file(args.file)
    d = {"path": str(args.file), **aggregator.describe()}
    if args.out:
        picture = mixing_weights_picture(aggregator.mixing_weights(), aggregator.layers, aggregator.timesteps,
                                         f"{aggregator.source}: mixing weights ({Path(args.file).name})")
        save_picture(picture, Path(args.out))
        d["picture"] = str(args.out)
    d["mixing_weights"] = aggregator.mixing_weights().round(6).tolist()
    print(json.dumps(d, indent=2) if args.json else format_aggregator(d) +
          (f"\n  mixing weights picture: {args.out}" if args.out else ""))
    return 0


def _hyper_record(path) -> dict | None:
    """An export's ``extra["hyper"]`` (the ``--aggregator`` output), or None."""
    if Path(path).suffix not in (".onnx", ".plan"):
        return None
    from ..formats.artifact import read_info

    try:
        return read_info(path).extra.get("hyper")
    except (ValueError, OSError):
        return None


def _extend_info(sub) -> None:
    """Teach ``info`` (runtime/cli.py) about aggregator files: ``--out`` writes their heat map."""
    info = sub.choices.get("info")
    if info is None:
        raise RuntimeError("register the runtime commands before the hyper commands (cli/main.py COMMANDS)")
    info.add_argument("--out", metavar="weights.png", help="aggregator files: write the mixing weights as a "
                      "layers x timesteps heat map")
    info.description += ("\n\nAn aggregator.safetensors (train-aggregator) gives its source, layers, timesteps and "
                         "mixing weights;\n  cleandift-rt info runs/hyper/aggregator.safetensors --out weights.png")
    plain = info.get_default("func")

    def cmd_info(args) -> int:
        from ..hyper.aggregator import is_aggregator_file

        if is_aggregator_file(args.file):
            return cmd_info_aggregator(args)
        if args.out:
            raise UserError(f"--out writes the mixing weights of an aggregator file; {args.file} is not one")
        status = plain(args)
        record = _hyper_record(args.file)
        if status == 0 and record and not args.json:
            print(f"  hyper: {record['channels']} ch, /{record['stride']}, the {record.get('source', '?')} aggregator "
                  f"{record.get('aggregator', '')} over {', '.join(record.get('layers', []))} at timesteps "
                  f"{', '.join(f'{t:g}' for t in record.get('timesteps', []))}")
        return status

    info.set_defaults(func=cmd_info)


def open_hyper_engine(args, aggregator):
    """``cli.common.open_engine`` with ``aggregator=``: the engine's ``extract`` then returns "hyper" too."""
    from ..runtime.engine import Engine

    exported = Path(args.engine).suffix in (".onnx", ".plan")  # --base then serves the text encoder only
    kwargs = {"base": None if exported else args.base, "device": args.device, "backend": args.backend,
              "precision": args.precision, "aggregator": aggregator}
    if args.size:
        kwargs["size"] = tuple(args.size)
    return Engine(args.engine, **kwargs)


def hyper_source(args):
    """``args.aggregator`` as a feature source of ``evaluation.runner.evaluate`` (eval-spair / match --aggregator).

    Sources cleandift / cleandift-heads run ``args.engine`` with the aggregator; inversion / one-step
    run the base model ``args.base`` exactly as the aggregator was trained (its recorded settings).
    """
    from .common import engine_identity
    from ..hyper.aggregator import ENGINE_SOURCES, Aggregator
    from ..checkpoint import file_identity, short_hash
    from ..hyper.sources import HyperFeatures
    from ..models import load_base

    aggregator = Aggregator.from_file(args.aggregator)
    if aggregator.source in ENGINE_SOURCES:
        if not getattr(args, "engine", None):
            raise UserError(f"{args.aggregator} aggregates {aggregator.source} features: pass --engine FILE")
        engine = open_hyper_engine(args, args.aggregator)
        return HyperFeatures.from_engine(engine, short_hash(engine_identity(args, engine), file_identity(args.aggregator)))
    if not getattr(args, "base", None):
        raise UserError(f"{args.aggregator} aggregates the base model's {aggregator.source} features: pass --base DIR")
    import torch

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    return HyperFeatures.from_inversion(aggregator, load_base(args.base, device=device),
                                        short_hash(file_identity(args.base), file_identity(args.aggregator)))


def register(sub) -> None:
    """Add 'train-aggregator' and teach 'info' about aggregator files."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train-aggregator", formatter_class=fmt,
                       help="train a Diffusion Hyperfeatures aggregator on SPair-71k",
                       description="Learn one descriptor map from every tap (and timestep) of a feature source with "
                       "the aggregation network of Diffusion Hyperfeatures (SPEC section 8): per-layer bottlenecks, "
                       "softmax mixing weights, CLIP-style loss, AdamW 1e-3. Features are computed once per image "
                       "and cached in fp16; progress bar, atomic checkpoints, --resume continues exactly. Writes "
                       "OUT/aggregator.safetensors, OUT/metrics.jsonl and OUT/mixing_weights.png.\n\n" + TRAIN_EXAMPLE)
    p.add_argument("--root", required=True, metavar="DIR", help="SPair-71k folder (PairAnnotation/, JPEGImages/)")
    p.add_argument("--source", required=True, choices=["cleandift", "cleandift-heads", "inversion", "one-step"],
                   help="cleandift: the student's taps from one pass; cleandift-heads: the same through the release "
                   "heads at S timesteps; inversion: the base model's DDIM inversion (the original); one-step: one "
                   "base-model call at timestep -1")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoints, metrics, aggregator.safetensors")
    g = p.add_argument_group("models")
    g.add_argument("--engine", metavar="FILE", help="cleandift sources: .onnx / .plan / student .safetensors")
    g.add_argument("--base", metavar="DIR", help="base SD model: inverted by inversion / one-step; VAE and text "
                   "encoder of a student file")
    g.add_argument("--heads", metavar="FILE", help="cleandift-heads: the student's _full file whose heads it uses")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: the best available)")
    g.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help=f"input size (default {DEFAULT_SIZE} for "
                   "the PyTorch backend and the inversion sources; an export runs at its own)")
    g.add_argument("--backend", choices=["onnxruntime", "openvino", "tensorrt", "torch"], help="what runs --engine")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="engine precision (default fp32)")
    g = p.add_argument_group("features")
    g.add_argument("--layers", nargs="+", choices=TAPS, help="taps to aggregate (default all 11)")
    g.add_argument("--timesteps", type=positive_int, metavar="S", help="cleandift-heads: S evenly spaced head "
                   "timesteps in [0, 999] (default 11)")
    g.add_argument("--inversion-steps", type=positive_int, default=50, metavar="T", help="inversion: DDIM steps (50)")
    g.add_argument("--saved-steps", type=positive_int, default=11, metavar="S", help="inversion: steps whose taps are "
                   "kept (11: U-Net timesteps -1, 60, 160, ..., 960 for T = 50)")
    g.add_argument("--cache", metavar="DIR|none", help="feature cache (default OUT/features; share it between runs "
                   "of one engine); 'none' recomputes every time (for inversion: 50 U-Net calls per image per use)")
    g = p.add_argument_group("training")
    g.add_argument("--split", default="trn", choices=["trn", "val", "test"], help="training pairs (default trn)")
    g.add_argument("--val-split", default="val", choices=["trn", "val", "test"], help="validation pairs (default val)")
    g.add_argument("--categories", nargs="+", metavar="CAT", help="only these categories")
    g.add_argument("--steps", type=positive_int, default=5000, help="training pairs = steps (default 5000, the recipe)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3, weight decay 0)")
    g.add_argument("--val-pairs", type=int, help="validation pairs (default min(360, steps // 10), at least 1; 0 = none)")
    g.add_argument("--validate-every", type=int, default=1000, help="steps between validations (default 1000)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    g.add_argument("--projection-dim", type=positive_int, default=384, help="descriptor channels (default 384)")
    g.add_argument("--output-stride", type=positive_int, default=8, help="image pixels per descriptor cell (default "
                   "8: 64 x 64 at 512 px)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, pair order, posterior samples (default 0)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_aggregator)
    _extend_info(sub)
