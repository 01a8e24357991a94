"""Diffusion Hyperfeatures' cost per source: descriptor time per image and training step time, one run.

Descriptor time: one photo to its aggregated descriptor map, everything included (preprocessing,
VAE encoder, U-Net call(s), heads, aggregation network), each source timed round-robin against the
others (bench/_common.compare, best of --repeats):

  cleandift        the student's 11 taps from ONE U-Net pass (Engine(..., aggregator=), PyTorch backend)
  cleandift-heads  the same pass, every tap through its projection head at S = 11 timesteps
  one-step         the original's one-step variant: one base U-Net call at timestep -1
  inversion        the original: 50-step DDIM inversion of the base model, 11 steps kept (50 U-Net calls)

Training step time: one pair (two images' cached features) through the aggregation network, the
CLIP loss, backward and AdamW, per source (the heads run on the fly for cleandift-heads).
Ratios are against cleandift. Models have random weights with the real topologies (never
downloaded): ``--model sd15`` writes an SD 1.5-size base model and a student once to --cache.

    python bench/aggregation.py --quick                 # tiny model at 128 px (seconds; proves the script)
    python bench/aggregation.py --model sd15 --size 512 # the numbers for docs/hyperfeatures.md (minutes:
                                                        # the inversion source alone is 50 U-Net calls)
Writes bench/results/aggregation-<time>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, print_machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cleandift", "cleandift-heads", "one-step", "inversion")


def ensure_models(variant: str, cache: Path) -> dict:
    """A base model folder and a student (_unet and _full with random heads), written once."""
    from cleandift_rt.models import load_base, save_student_full, save_student_unet, write_random_base
    from cleandift_rt.models.heads import build_heads

    folder = cache / variant
    paths = {"base": folder / "base", "unet": folder / "student_unet.safetensors",
             "full": folder / "student_full.safetensors"}
    if (folder / "done").is_file():
        return paths
    print(f"writing random {variant} models to {folder} (once)", flush=True)
    write_random_base(paths["base"], variant)
    base = load_base(paths["base"])
    student = copy.deepcopy(base.unet)
    heads = build_heads(base.block_out_channels)
    with torch.no_grad():  # trained heads are not the identity: same cost either way, real values
        for name, p in heads.named_parameters():
            if name.endswith(("down_proj.weight", "norm.linear.weight")):
                p.normal_(0, 0.02)
    save_student_unet(paths["unet"], student)
    save_student_full(paths["full"], student, heads, 261.0)
    (folder / "done").write_text("ok\n")
    return paths


def build(paths: dict, size: int, sources, steps: int, saved: int, folder: Path):
    """{source: (descriptor fn, training-step fn)} and the models they share."""
    from cleandift_rt import Engine
    from cleandift_rt.assets import load_photo
    from cleandift_rt.hyper.inversion import InversionExtractor, InversionSettings
    from cleandift_rt.hyper.loss import clip_loss
    from cleandift_rt.hyper.sources import EngineTaps, InversionTaps, head_timesteps, new_aggregator
    from cleandift_rt.models import load_base
    from cleandift_rt.models.heads import ProjectionHeads

    image = load_photo("cat")
    plain = Engine(paths["unet"], base=str(paths["base"]), size=(size, size))
    base = plain.backend.ref.base  # the one base model every source shares (VAE, U-Net for inversion)
    found = {}
    for source in sources:
        torch.manual_seed(0)
        if source in ("cleandift", "cleandift-heads"):
            stored = EngineTaps(plain, "bench")
            heads = ProjectionHeads.from_release(paths["full"]) if source == "cleandift-heads" else None
            agg = new_aggregator(source, stored, heads, head_timesteps(11) if heads is not None else None)
            path = agg.save(folder / f"{source}.safetensors")
            engine = Engine(paths["unet"], base=str(paths["base"]), size=(size, size), aggregator=path)
            descriptor = (lambda e=engine: e.extract([image], taps=["hyper"])["hyper"])
        else:
            settings = (InversionSettings.one_step(size=size) if source == "one-step" else
                        InversionSettings(steps=steps, saved=saved, size=size))
            stored = InversionTaps(InversionExtractor(base if base is not None else load_base(paths["base"]), settings),
                                   "bench")
            agg = new_aggregator(source, stored)

            def descriptor(s=stored, a=agg):
                with torch.no_grad():
                    return a({t: torch.from_numpy(v)[None] for t, v in s.compute(image).items()})
        arrays = stored.compute(image)  # the cached features of a training pair (the same image twice)
        feats = {t: torch.stack([torch.from_numpy(v)] * 2) for t, v in arrays.items()}
        optimizer = torch.optim.AdamW(agg.network.parameters(), lr=1e-3)
        idx = torch.arange(0, 60, 3)

        def train_step(a=agg, f=feats, opt=optimizer):
            a.train()
            desc = a(f)
            loss = clip_loss(desc[0], desc[1], idx, idx.flip(0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        found[source] = (descriptor, train_step)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model at 128 px, 1 repeat")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--inversion-steps", type=int, default=50)
    parser.add_argument("--saved-steps", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds after the warm-up (best is kept; 0 = "
                        "time the warm-up call itself)")
    parser.add_argument("--no-train", action="store_true", help="descriptor times only (a cleandift-heads training "
                        "step at SD size keeps ~11 GB of activations for backward)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache" / "aggregation",
                        help="random-weight models (written once)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.size, args.repeats = "tiny", 128, 1
    if "cleandift" not in args.sources:
        args.sources = ["cleandift", *args.sources]  # the reference of every ratio
    info = machine()
    print_machine(info)
    paths = ensure_models(args.model, args.cache)
    t0 = time.perf_counter()
    fns = build(paths, args.size, args.sources, args.inversion_steps, args.saved_steps, args.cache / args.model)
    print(f"models and aggregators ready in {time.perf_counter() - t0:.1f} s", flush=True)
    descriptors = compare({name: fn for name, (fn, _) in fns.items()}, args.repeats)
    steps = {} if args.no_train else compare({name: fn for name, (_, fn) in fns.items()}, args.repeats)
    rows = []
    ref_d = descriptors["cleandift"][0]
    ref_t = steps["cleandift"][0] if steps else None
    print(f"{args.model} at {args.size} px, {torch.get_num_threads()} threads; best of {args.repeats} round(s); "
          f"inversion: {args.inversion_steps} steps, {args.saved_steps} kept")
    print(f"{'source':<16} {'s / descriptor':>15} {'x cleandift':>12} {'peak MB':>8} {'s / train step':>15} "
          f"{'x cleandift':>12}")
    for name in fns:
        seconds, peak, _ = descriptors[name]
        row = {"source": name, "descriptor_seconds": seconds, "descriptor_ratio": seconds / ref_d,
               "descriptor_peak_extra_mb": peak}
        line = f"{name:<16} {seconds:>15.3f} {seconds / ref_d:>12.2f} {peak:>8.0f}"
        if steps:
            step_s = steps[name][0]
            row.update(train_step_seconds=step_s, train_step_ratio=step_s / ref_t)
            line += f" {step_s:>15.3f} {step_s / ref_t:>12.2f}"
        rows.append(row)
        print(line)
    result = {"model": args.model, "size": args.size, "repeats": args.repeats, "inversion_steps": args.inversion_steps,
              "saved_steps": args.saved_steps, "rows": rows, "machine": info}
    print(f"written {write_json('aggregation', result)}")


if __name__ == "__main__":
    main()
