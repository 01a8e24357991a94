"""``cleandift-rt distill-encoder``: a fast encoder in place of the base VAE's encoder
(:class:`~cleandift_rt.training.encoder.EncoderDistiller`; docs/fast_encoder.md)."""

from __future__ import annotations

import argparse
import os

from .common import add_output_args, add_run_args, add_size_arg, positive_int, square_side

DESCRIPTION = """\
Train a fast encoder (diffusers AutoencoderTiny, TAESD's architecture; about 1.2 M parameters) to give
exactly the latents the engine feeds the U-Net (the base VAE's posterior mean x its scaling factor)
on your images: random crops and flips, mean squared error on the latents. metrics.jsonl records
val_latent_error, the held-out error (0: the VAE's latents exactly; 1: no better than all-zero
latents), before the first step, every --validate-every steps and at the end. OUT becomes a diffusers
AutoencoderTiny folder with cleandift_encoder.json (the base VAE it imitates, its hash, the errors);
checkpoints are atomic and --resume continues exactly.

Then adapt the student to it (train/train.py ... --encoder OUT), export with it
(export/export_onnx.py ... --encoder OUT) and check the features on your images first:
  cleandift-rt compare sd21.onnx sd21-fast.onnx --images photos/"""

EXAMPLES = """\
examples (docs/fast_encoder.md):
  cleandift-rt distill-encoder --base sd21/ --data photos/ --out taesd-sd21/ --init taesd/ --steps 2000
  cleandift-rt distill-encoder --base sd21/ --data photos/ --out taesd-as-is/ --init taesd/ --steps 0
      # public TAESD weights as they are: measured on your held-out images and recorded
  cleandift-rt distill-encoder --base sd21/ --data photos/ --out enc/ --steps 4000    # a new encoder"""


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model (diffusers folder or .safetensors) whose VAE is imitated")
    p.add_argument("--data", required=True, help="folder of your images (.jpg/.png/.webp; captions not needed)")
    add_output_args(p, "DIR", "the fast encoder's folder (AutoencoderTiny files, cleandift_encoder.json, "
                    "metrics.jsonl, checkpoints/)")
    p.add_argument("--init", metavar="DIR", help="start from this diffusers AutoencoderTiny folder (TAESD for SD 1.x / "
                   "2.x); with --steps 0 it is recorded as it is")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000; 0 with --init: no training)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="crops per step (default 8)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-4 from --init, 1e-3 for a new encoder)")
    add_size_arg(p, "side images are brought to first, as the engine does (default: the base model's resolution)")
    p.add_argument("--crop", type=positive_int, default=256, help="side of the random crops (multiple of 8, default "
                   "256; at most --size)")
    p.add_argument("--resize", choices=("stretch", "pad"), default="stretch", help="the engine's size policy")
    p.add_argument("--width", type=positive_int, help="channels of a new encoder (default: TAESD's 64)")
    p.add_argument("--val-data", metavar="DIR", help="held-out images (default: --val-images of --data held out)")
    p.add_argument("--val-images", type=positive_int, default=4, help="held-out images (default 4)")
    p.add_argument("--validate-every", type=int, default=100, help="held-out error every N steps (0: only first "
                   "and last)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="keep the newest K checkpoints")
    add_run_args(p, seed="seed of the initialisation, data order, crops and flips (default 0)", resume=True,
                 device=True)


def cmd_distill_encoder(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..training.encoder import EncoderDistillConfig, EncoderDistiller

    config = EncoderDistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  size=square_side(args.size, "distill-encoder"), crop=args.crop, resize=args.resize,
                                  width=args.width, val_data=args.val_data, val_images=args.val_images,
                                  validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
                                  keep_checkpoints=args.keep_checkpoints, seed=args.seed, device=args.device)
    EncoderDistiller(config, args.base, args.data, args.out, init=args.init, resume=args.resume or None,
                     progress=not args.no_progress).run()
    return 0


def register(sub) -> None:
    """Add the 'distill-encoder' command to the cleandift-rt parser."""
    p = sub.add_parser("distill-encoder", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="train a fast encoder (AutoencoderTiny / TAESD) to give the VAE's latents",
                       description=DESCRIPTION + "\n\n" + EXAMPLES)
    add_distill_args(p)
    p.set_defaults(func=cmd_distill_encoder)
