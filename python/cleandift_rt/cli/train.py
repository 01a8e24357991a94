"""``cleandift-rt train`` and ``python train/train.py``: the command-line front end of
:class:`~cleandift_rt.training.Trainer`. Both take the same flags; the script keeps its own error
prefix (``train.py: error:``) and exit statuses (2: bad input, 130: interrupted)."""

from __future__ import annotations

import argparse
import os
import sys

from ..conditioning import HEAD_CONDITIONINGS
from ..training.config import LOSSES, PRESETS, build_config, parse_override
from .common import Parser, UserError, add_output_args, add_run_args, add_size_arg, square_side

# flag -> config field, for the flags that map one to one
_FLAG_FIELDS = ("steps", "batch_size", "lr", "warmup_steps", "grad_accum", "timesteps_per_image", "loss",
                "lora_rank", "seed", "device", "val_data", "val_images", "validate_every", "checkpoint_every",
                "keep_checkpoints", "resize", "head_conditioning", "encoder")

DESCRIPTION = "Train a CleanDIFT student from a local SD 1.5 / 2.1 base model."
EPILOG = ("Extra key=value arguments override any config field, e.g. lr=1e-5 taps='[\"us6\"]' bf16=true. "
          "Precedence: defaults < --preset < --config < flags < key=value.")
EXAMPLES = """\
examples (docs/training.md):
  cleandift-rt train --base ./stable-diffusion-2-1 --data ./coyo-3k --out runs/sd21 --steps 400 --batch-size 8 \\
      --bf16                                                 # the paper's setting (defaults)
  cleandift-rt train --base ./sd21 --data ./imgs --out runs/a --preset release --steps 4000
  cleandift-rt train --base ./sd21 --data ./imgs --out runs/a --preset release --steps 4000 --resume  # after a stop
python train/train.py takes the same flags."""


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training flags, shared by ``cleandift-rt train`` and ``train/train.py``."""
    p.add_argument("--base", required=True, help="base model: diffusers folder or single .safetensors file")
    p.add_argument("--data", required=True, help="folder of name.jpg|png|webp images with name.json/name.txt captions")
    add_output_args(p, "DIR", "output folder (metrics, checkpoints, student files)")
    p.add_argument("--config", help="JSON file of config fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper (default values) or release (lr 1e-5, 2000 warmup)")
    p.add_argument("--steps", type=int, help="optimiser steps (paper: 400)")
    p.add_argument("--batch-size", type=int, help="images per micro-batch (paper: 8)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    add_size_arg(p, "image size in pixels, square (default: the base model's resolution)")
    p.add_argument("--resize", choices=("stretch", "pad"), help="resize policy, as at inference (default stretch)")
    p.add_argument("--lr", type=float, help="peak learning rate (paper: 2e-6)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps")
    p.add_argument("--timesteps-per-image", type=int, help="I stratified timesteps per image (paper: 3)")
    p.add_argument("--loss", choices=LOSSES, help="feature loss (paper: cosine)")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the full U-Net (e.g. 64)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute student activations")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--no-captions", action="store_true",
                      help="train prompt-free: teacher and student see the \"\" prompt (text_conditioning=none)")
    text.add_argument("--distill-text", action="store_true",
                      help="distil the captions into a prompt-free student: the teacher sees each caption, the "
                      "student \"\" (text_conditioning=distill; paper appendix B)")
    p.add_argument("--head-conditioning", choices=HEAD_CONDITIONINGS,
                   help="projection heads: adarms (the release, default) or film (scale and shift; paper appendix E)")
    p.add_argument("--encoder", metavar="DIR", help="adapt the student to a fast encoder (cleandift-rt "
                   "distill-encoder): it sees that encoder's latents of the clean image, the teacher the VAE's of "
                   "the noisy one")
    p.add_argument("--val-data", help="held-out image folder (default: hold out val_images training images)")
    p.add_argument("--val-images", type=int, help="number of held-out validation images")
    p.add_argument("--validate-every", type=int, help="validate every N steps (0: never)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints")
    g = add_run_args(p, seed="seed of the initialisation, data order and noise (default 0)", seed_default=None,
                     resume=True, device=True)
    g.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint file (or folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python train/train.py``."""
    p = Parser(prog="train.py", description=DESCRIPTION, epilog=EPILOG)
    add_train_args(p)
    return p


def run(args) -> dict:
    """Train from parsed flags; the run's summary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    values = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name) is not None}
    side = square_side(args.size, "train")
    if side is not None:
        values["size"] = side
    for name in ("bf16", "gradient_checkpointing"):
        if getattr(args, name):
            values[name] = True
    if args.no_captions:
        values["text_conditioning"] = "none"
    if args.distill_text:
        values["text_conditioning"] = "distill"
    values.update(dict(parse_override(o) for o in args.overrides))
    config = build_config(args.preset, args.config, values)
    from ..training.trainer import Trainer

    resume = args.resume_from or args.resume or None
    trainer = Trainer(config, args.base, args.data, args.out, resume=resume, progress=not args.no_progress)
    return trainer.run()


def main(argv: list[str] | None = None) -> dict:
    """``train/train.py``'s flags in, the run's summary out."""
    return run(build_parser().parse_args(argv))


def entry(argv: list[str] | None = None) -> int:
    """Run :func:`main`, turning bad input into a one-line message and exit status 2."""
    try:
        main(argv)
    except (UserError, ValueError, TypeError, OSError, ArithmeticError) as exc:  # a diverged run: FloatingPointError
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted; continue from the last checkpoint with the same command plus --resume",
              file=sys.stderr)
        return 130
    return 0


def cmd_train(args) -> int:
    run(args)
    return 0


def register(sub) -> None:
    """Add the 'train' command to the cleandift-rt parser."""
    p = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="train a CleanDIFT student (the same as python train/train.py)",
                       description=DESCRIPTION + "\n\n" + EXAMPLES, epilog=EPILOG)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
