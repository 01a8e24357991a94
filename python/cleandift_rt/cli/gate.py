"""``cleandift-rt train-gate`` and ``cleandift-rt content-shift``: GATE's amalgamation and its technique check."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .common import (UserError, add_output_args, add_run_args, add_size_arg, best_device, positive_int, read_image,
                     save_picture, square_side, write_json)

SUMMARY_PAIRS = 100  # train-gate reports the mean loss over at most this many training pairs before and after

TRAIN_EXAMPLE = """\
examples:
  # CPU smoke run (the defaults: the first 4 usable pairs, 256 px, 2 epochs)
  cleandift-rt train-gate --root SPair-71k --base sd15/ --bucket bucket.json --out runs/gate
  # the paper's recipe (docs/method.md, GATE): 2 x 5000 random training pairs at 512 px, 360 val pairs
  cleandift-rt train-gate --root SPair-71k --base sd15/ --bucket bucket.json --out runs/gate --preset paper
  # then: cleandift-rt eval-spair --root SPair-71k --gate runs/gate --out gate.json
The bucket file (docs/gate.md) lists the technique combinations, e.g. the paper's correspondence
bucket: 2 x fine-grained prompt, 2 x LoRA, 2 x ControlNet (t 60 -> 50), one attention feature."""

SHIFT_EXAMPLE = """\
example:
  cleandift-rt content-shift cat.jpg --base sd15/ --controlnet control_sd15_canny/ \\
      --lora spair_style.safetensors --prompt "a photo of a cat, high quality, masterpiece" --out shift/
prints each technique's content-shift score (1 - diff / diff of the plain baseline; 1 = contours as
at t = 0, 0 = no better than no technique) and writes shift/content_shift.json and
shift/img2img.png (input | reference img2img at high strength | img2img with each technique)."""


def _train_config(args):
    from ..gate.train import PRESETS, GateTrainConfig

    values = dict(PRESETS[args.preset], preset=args.preset)
    flags = {"epochs": args.epochs, "pairs_per_epoch": args.pairs_per_epoch, "max_pairs": args.pairs,
             "size": square_side(args.size, "train-gate"), "lr": args.lr, "weight_decay": args.weight_decay,
             "sparsity": args.sparsity, "val_pairs": args.val_pairs, "validate_every": args.validate_every,
             "checkpoint_every": args.checkpoint_every, "seed": args.seed}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.all_pairs:
        values["max_pairs"] = None
    if args.no_output_conv:
        values["output_conv"] = False
    return GateTrainConfig(**values).check()


def _open_models(args, bucket=None, controlnets=None, loras=None, size=None):
    from ..gate.extract import GateExtractor
    from ..models import load_base, load_student

    import torch

    device = best_device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here (use --device cpu)")
    base = load_base(args.base)
    student = load_student(args.student, base) if getattr(args, "student", None) else None
    kwargs = dict(student=student, size=size, device=device)
    if bucket is not None:
        return GateExtractor.for_bucket(bucket, base, **kwargs)
    return GateExtractor(base, controlnets=controlnets, loras=loras, **kwargs)


def cmd_train_gate(args) -> int:
    from ..evaluation.spair import load_spair
    from ..gate.recipe import Bucket
    from ..gate.train import GateTrainer

    config = _train_config(args)
    bucket = Bucket.load(args.bucket)
    pairs, skips = load_spair(args.root, args.split, categories=args.categories)
    for line in skips.lines():
        print(f"note: {line}")
    val_pairs = []
    if config.val_pairs:
        val_pairs, _ = load_spair(args.root, args.val_split, categories=args.categories)
    extractor = _open_models(args, bucket=bucket, size=config.size)
    trainer = GateTrainer(extractor, bucket, pairs, args.out, config, val_pairs=val_pairs, resume=args.resume,
                          progress=not args.no_progress, features_dir=args.cache)
    probe = trainer.pool[:SUMMARY_PAIRS]
    before = trainer.mean_loss(probe)
    summary = trainer.run()
    after = trainer.mean_loss(probe)
    summary.update(loss_before=before, loss_after=after, loss_pairs=len(probe), config=dataclasses.asdict(config))
    write_json(summary, Path(args.out) / "summary.json")
    print(f"mean CLIP loss over {len(probe)} training pairs: {before:.4f} before this run, {after:.4f} after; "
          f"evaluate with: cleandift-rt eval-spair --root {args.root} --gate {args.out} --out gate.json")
    return 0


def _techniques(args) -> tuple[dict, dict, dict]:
    """(recipes by technique name, ControlNets by name, LoRAs by name) from the flags."""
    from ..gate.recipe import GateRecipe

    base = dict(prompt=args.base_prompt, t=args.t, seed=args.seed)
    recipes, controlnets, loras = {}, {}, {}
    if args.prompt:
        recipes["prompt"] = GateRecipe(**dict(base, prompt=args.prompt))
    if args.controlnet:
        controlnets["controlnet"] = args.controlnet
        recipes["controlnet"] = GateRecipe(**base, controlnet="controlnet", controlnet_scale=args.controlnet_scale,
                                           t_start=args.t_start)
    for path in args.lora or []:
        name = f"lora {Path(path).stem}"
        if name in loras:
            name = f"{name} ({len(loras)})"
        loras[name] = path
        recipes[name] = GateRecipe(**base, lora=name, lora_scale=args.lora_scale)
    if not recipes:
        raise UserError("name at least one technique to score: --prompt TEXT, --controlnet DIR or --lora FILE")
    if len(recipes) > 1:
        recipes["all"] = GateRecipe(prompt=args.prompt or args.base_prompt, t=args.t, seed=args.seed,
                                    controlnet="controlnet" if controlnets else None,
                                    controlnet_scale=args.controlnet_scale, t_start=args.t_start if controlnets else None,
                                    lora=next(iter(loras), None), lora_scale=args.lora_scale)
    return recipes, controlnets, loras


def cmd_content_shift(args) -> int:
    from ..gate.compare import content_shift_table, format_table, img2img_comparison

    image = read_image(Path(args.image))
    recipes, controlnets, loras = _techniques(args)
    extractor = _open_models(args, controlnets=controlnets, loras=loras, size=args.size)
    rows = content_shift_table(extractor, image, recipes, t=args.t, seed=args.seed, prompt=args.base_prompt,
                               category=args.category)
    print(format_table(rows))
    out = Path(args.out)
    doc = {"image": str(args.image), "base": args.base, "t": args.t, "seed": args.seed, "size": list(extractor.size),
           "reference": "the plain recipe at t = 0", "anchor": f"the plain recipe at t = {args.t}", "scores": rows}
    if not args.no_picture:
        picture = img2img_comparison(extractor, image, recipes, strength=args.strength, steps=args.steps,
                                     guidance=args.guidance, seed=args.seed, prompt=args.base_prompt,
                                     category=args.category)
        save_picture(picture, out / "img2img.png")
        doc["picture"] = str(out / "img2img.png")
        doc["img2img"] = {"strength": args.strength, "steps": args.steps, "guidance": args.guidance}
    write_json(doc, out / "content_shift.json")
    print(f"wrote {out / 'content_shift.json'}" + ("" if args.no_picture else f" and {out / 'img2img.png'}"))
    return 0


def register(sub) -> None:
    """Add the 'train-gate' and 'content-shift' commands to the cleandift-rt parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train-gate", formatter_class=fmt, help="train GATE's feature amalgamation on SPair-71k pairs",
                       description="Extract a bucket of technique-enhanced diffusion features (cached in fp16) for "
                       "SPair-71k training pairs and train GATE's weight assigner with the CLIP loss plus the "
                       "sparsity term (AdamW 5e-4, weight decay 0.01). Progress bars, atomic checkpoints, --resume "
                       "continues exactly.\n\n" + TRAIN_EXAMPLE)
    p.add_argument("--root", required=True, metavar="DIR", help="SPair-71k folder (PairAnnotation/, JPEGImages/)")
    p.add_argument("--base", required=True, metavar="DIR", help="base SD model (diffusers folder or .safetensors)")
    p.add_argument("--bucket", required=True, metavar="FILE.json", help="the technique combinations (docs/gate.md)")
    add_output_args(p, "DIR", "features, checkpoints, metrics and gate.safetensors")
    p.add_argument("--student", metavar="FILE", help="a CleanDIFT student file: one-pass recipes on its clean latent")
    p.add_argument("--split", default="trn", choices=["trn", "val", "test"], help="pairs to train on (default trn)")
    p.add_argument("--val-split", default="val", choices=["trn", "val", "test"], help="validation pairs (default val)")
    p.add_argument("--categories", nargs="+", metavar="CAT", help="only these categories")
    p.add_argument("--preset", default="smoke", choices=["smoke", "paper"], help="smoke (default) or paper")
    p.add_argument("--pairs", type=positive_int, help="use the first N usable pairs (smoke: 4)")
    p.add_argument("--all-pairs", action="store_true", help="use every pair of the split")
    p.add_argument("--pairs-per-epoch", type=positive_int, help="random pairs per epoch (paper: 5000)")
    p.add_argument("--epochs", type=positive_int, help="epochs (default 2)")
    add_size_arg(p, "model input in px, multiples of 64, square (smoke: 256)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    p.add_argument("--sparsity", type=float, help="weight of the sparsity term (default 1e-3)")
    p.add_argument("--no-output-conv", action="store_true", help="the paper's 'nn' setting: no Conv3x3 after mixing")
    p.add_argument("--val-pairs", type=int, help="validation pairs (paper: 360; 0 = none)")
    p.add_argument("--validate-every", type=int, help="steps between validations (paper: 500)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0 = only at the end)")
    add_run_args(p, seed="model initialisation and pair order (default 0)", seed_default=None,
                 cache="feature cache shared between runs (default OUT/features)", resume=True, device=True)
    p.set_defaults(func=cmd_train_gate)

    p = sub.add_parser("content-shift", formatter_class=fmt, help="score how much a technique suppresses content shift",
                       description="GATE's technique check (paper section 5): the content-shift score of each "
                       "technique's conv features against the features at t = 0, with the plain noisy baseline as "
                       "the anchor, and the img2img comparison picture for you to judge.\n\n" + SHIFT_EXAMPLE)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--base", required=True, metavar="DIR", help="base SD model (needs its VAE decoder and scheduler)")
    add_output_args(p, "DIR", "content_shift.json and img2img.png go here")
    p.add_argument("--prompt", help="a fine-grained prompt to score (the technique)")
    p.add_argument("--controlnet", metavar="DIR", help="a diffusers ControlNetModel folder (Canny control)")
    p.add_argument("--lora", action="append", metavar="FILE", help="a LoRA .safetensors or merged U-Net folder "
                   "(repeatable; 'all' combines the techniques with the first LoRA)")
    p.add_argument("--base-prompt", default="", help="prompt of the baseline and of the other techniques (default '')")
    p.add_argument("--category", default="", help="fills {category} in the prompts")
    p.add_argument("--t", type=int, default=50, help="feature timestep (default 50)")
    p.add_argument("--t-start", type=int, help="ControlNet with multi-step denoising from this timestep (e.g. 60)")
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="conditioning scale (default 1)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA scale (default 1)")
    add_size_arg(p, "model input in px, multiples of 64 (default: the base model's)")
    p.add_argument("--strength", type=float, default=0.8, help="img2img strength of the picture (default 0.8)")
    p.add_argument("--steps", type=positive_int, default=50, help="img2img scheduler steps (default 50)")
    p.add_argument("--guidance", type=float, default=1.0, help="img2img guidance scale (default 1: no CFG, as the "
                   "features)")
    p.add_argument("--no-picture", action="store_true", help="scores only (the picture needs a VAE decoder pass per panel)")
    add_run_args(p, seed="noise seed (default 0)", progress=False, device=True)
    p.set_defaults(func=cmd_content_shift)
