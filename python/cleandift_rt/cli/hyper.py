"""``cleandift-rt train-aggregator``: Diffusion Hyperfeatures.

Also what the evaluation and match commands need to use a trained aggregator: :func:`hyper_source`
(``--aggregator FILE`` as a feature source of ``evaluation.runner.evaluate``, whose
``features(image)`` also gives ``match`` its descriptor maps). ``info`` on an aggregator file is
``cli.info``'s aggregator kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.pck import spair_validator
from ..taps import TAPS
from .common import (UserError, add_engine_args, add_output_args, add_run_args, best_device, engine_identity,
                     open_engine, positive_int, square_side)

DEFAULT_SIZE = 512  # the recipe's input size (docs/method.md, Diffusion Hyperfeatures)

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


def _open_engine(args, source: str):
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
    side = square_side(args.size, f"--source {source}") or DEFAULT_SIZE
    settings = (InversionSettings.one_step(size=side, seed=args.seed) if source == "one-step" else
                InversionSettings(steps=args.inversion_steps, saved=args.saved_steps, size=side, seed=args.seed))
    base = load_base(args.base, device=best_device(args.device))
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


def hyper_source(args):
    """``args.aggregator`` as a feature source of ``evaluation.runner.evaluate`` (eval-spair / match --aggregator).

    Sources cleandift / cleandift-heads run ``args.engine`` with the aggregator; inversion / one-step
    run the base model ``args.base`` exactly as the aggregator was trained (its recorded settings).
    """
    from ..hyper.aggregator import ENGINE_SOURCES, Aggregator
    from ..checkpoint import file_identity, short_hash
    from ..hyper.sources import HyperFeatures
    from ..models import load_base

    aggregator = Aggregator.from_file(args.aggregator)
    if aggregator.source in ENGINE_SOURCES:
        if not getattr(args, "engine", None):
            raise UserError(f"{args.aggregator} aggregates {aggregator.source} features: pass --engine FILE")
        engine = open_engine(args, aggregator=args.aggregator)
        return HyperFeatures.from_engine(engine, short_hash(engine_identity(args, engine), file_identity(args.aggregator)))
    if not getattr(args, "base", None):
        raise UserError(f"{args.aggregator} aggregates the base model's {aggregator.source} features: pass --base DIR")
    base = load_base(args.base, device=best_device(getattr(args, "device", None)))
    return HyperFeatures.from_inversion(aggregator, base, short_hash(file_identity(args.base), file_identity(args.aggregator)))


def register(sub) -> None:
    """Add the 'train-aggregator' command to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train-aggregator", formatter_class=fmt,
                       help="train a Diffusion Hyperfeatures aggregator on SPair-71k",
                       description="Learn one descriptor map from every tap (and timestep) of a feature source with "
                       "the aggregation network of Diffusion Hyperfeatures (docs/method.md): per-layer bottlenecks, "
                       "softmax mixing weights, CLIP-style loss, AdamW 1e-3. Features are computed once per image "
                       "and cached in fp16; progress bar, atomic checkpoints, --resume continues exactly. Writes "
                       "OUT/aggregator.safetensors, OUT/metrics.jsonl and OUT/mixing_weights.png.\n\n" + TRAIN_EXAMPLE)
    p.add_argument("--root", required=True, metavar="DIR", help="SPair-71k folder (PairAnnotation/, JPEGImages/)")
    p.add_argument("--source", required=True, choices=["cleandift", "cleandift-heads", "inversion", "one-step"],
                   help="cleandift: the student's taps from one pass; cleandift-heads: the same through the release "
                   "heads at S timesteps; inversion: the base model's DDIM inversion (the original); one-step: one "
                   "base-model call at timestep -1")
    add_output_args(p, "DIR", "checkpoints, metrics, aggregator.safetensors")
    g = add_engine_args(p, tap=None, engine_required=False,
                        base_help="base SD model: inverted by inversion / one-step; VAE and text encoder of a student "
                        "file", size_help=f"input size (default {DEFAULT_SIZE} for the PyTorch backend and the "
                        "inversion sources; an export runs at its own)")
    g.add_argument("--heads", metavar="FILE", help="cleandift-heads: the student's _full file whose heads it uses")
    g = p.add_argument_group("features")
    g.add_argument("--layers", nargs="+", choices=TAPS, help="taps to aggregate (default all 11)")
    g.add_argument("--timesteps", type=positive_int, metavar="S", help="cleandift-heads: S evenly spaced head "
                   "timesteps in [0, 999] (default 11)")
    g.add_argument("--inversion-steps", type=positive_int, default=50, metavar="T", help="inversion: DDIM steps (50)")
    g.add_argument("--saved-steps", type=positive_int, default=11, metavar="S", help="inversion: steps whose taps are "
                   "kept (11: U-Net timesteps -1, 60, 160, ..., 960 for T = 50)")
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
    add_run_args(p, seed="initial weights, pair order, posterior samples (default 0)", resume=True,
                 cache="feature cache (default OUT/features; share it between runs of one engine); 'none' recomputes "
                 "every time (for inversion: 50 U-Net calls per image per use)", cache_metavar="DIR|none")
    p.set_defaults(func=cmd_train_aggregator)
