"""Fusion benchmark: seconds per SPair-size pair for each recipe (nn, tale, tlfr) from scratch (no cache),
with DINOv2 at tiny and ViT-B/14 size (random weights, the real topology), side by side in one run,
plus the two peers inside the recipes:

* DINOv2: ``Dinov2Features`` (hub-style position interpolation, pre-LayerNorm tokens) vs
  transformers' own ``Dinov2Model`` forward with ``output_hidden_states=True`` at the same canvas;
* window soft-argmax: ours (closed form over the window, outside cells as one shared logit) vs the
  reference formulation (dense source x target similarity matrix, multiplied by the window mask,
  softmax over the whole grid), at the recipe's 60 x 60 grid and 3968 channels.

The SD side is the tiny SD 2.1-topology model by default (its cost is small; a real student's is
what bench/extract.py measures), or any engine with --engine. Records the CPU model and flags;
JSON in bench/results/.

    python bench/fusion.py --quick                 # tiny DINOv2 only (seconds)
    python bench/fusion.py                         # tiny and ViT-B/14-size DINOv2 (minutes on 2 cores)
    python bench/fusion.py --engine sd21_student.safetensors --base sd21/   # a real SD side
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, print_machine, write_json  # noqa: E402

from cleandift_rt import Dinov2Features, Engine  # noqa: E402
from cleandift_rt.evaluation.transfer import transfer_points  # noqa: E402
from cleandift_rt.fusion import RECIPES, Fusion  # noqa: E402
from cleandift_rt.fusion.canvas import square_canvas  # noqa: E402
from cleandift_rt.fusion.dinov2 import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cleandift_rt.kernels.refine import soft_argmax  # noqa: E402

DINO_SIZES = {"tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
              "vitb": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}}  # ViT-B/14, docs/method.md, zero-shot fusion


def write_dino(kind: str, root: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0,
                          qkv_bias=True, **DINO_SIZES[kind])
    path = root / f"dinov2-{kind}"
    Dinov2Model(config).eval().save_pretrained(path)
    return path


def spair_pair():
    """A source / target pair at SPair-71k's usual size (500 x 375 and 375 x 500), 10 keypoints."""
    from cleandift_rt.assets import load_photo
    from PIL import Image

    src = load_photo("cat").resize((500, 333), Image.BICUBIC)
    trg = load_photo("coffee").resize((375, 500), Image.BICUBIC)
    pts = np.stack([np.linspace(60, 440, 10), np.linspace(50, 280, 10)], 1)
    return src, trg, pts


def recipe_pair(fusion: Fusion, src, trg, pts, category: str = "cat"):
    """One pair from scratch: raw maps of source, target (and the mirrored source), fuse, match."""
    return fusion.transfer(src, trg, pts, category=category, keypoint_ids=list(range(len(pts))),
                           source_bbox=(20, 20, 480, 320), target_bbox=(20, 20, 360, 480))


def nn_pair(engine, src, trg, pts, tap: str = "us6"):
    """Today's protocol: one tap per image at the engine's size, bilinear upsampling, cosine argmax."""
    fa, fb = (torch.as_tensor(engine.extract([im], taps=[tap])[tap])[0] for im in (src, trg))
    return transfer_points(fa, fb, src.size, trg.size, pts)


def _pair_runner(fusion: Fusion, src, trg, pts):
    return lambda: recipe_pair(fusion, src, trg, pts)


def dino_peer(dino: Dinov2Features, repeats: int) -> dict:
    """Ours vs transformers' own forward (its exact-size position interpolation) on one canvas."""
    from cleandift_rt.assets import load_photo

    canvas, _ = square_canvas([load_photo("cat")], dino.size)
    pixels = (canvas - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def transformers_forward():
        with torch.no_grad():
            return dino.model(pixels, output_hidden_states=True).hidden_states[-1]

    res = compare({"ours": lambda: dino.canvas_features(canvas), "transformers": transformers_forward}, repeats)
    g = dino.grid
    theirs = res["transformers"][2][:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    return {"ours_s": res["ours"][0], "transformers_s": res["transformers"][0],
            "ratio": res["transformers"][0] / res["ours"][0],
            "max_abs_difference": float((res["ours"][2] - theirs).abs().max())}  # the interpolations differ


def refine_peer(repeats: int, grid: int = 60, channels: int = 3968, points: int = 20) -> dict:
    """Window soft-argmax, ours vs the dense reference formulation (same inputs, same argmax)."""
    from cleandift_rt import match

    gen = torch.Generator().manual_seed(0)
    dst = F.normalize(torch.randn(1, channels, grid, grid, generator=gen), dim=1)
    src = F.normalize(torch.randn(1, points, channels, generator=gen), dim=-1)
    index, _ = match(src, dst)

    def dense():
        sims = src[0] @ dst[0].flatten(1)  # [N, grid^2]
        x0, y0 = index[0] % grid, index[0] // grid
        offs = torch.arange(-5, 6)
        mask = torch.zeros(points, grid, grid)
        for n in range(points):
            ys = (y0[n] + offs).clamp(0, grid - 1)
            xs = (x0[n] + offs).clamp(0, grid - 1)
            mask[n, ys[:, None], xs[None, :]] = 1
        weights = torch.softmax(sims * mask.flatten(1) / 0.02, dim=1)
        coords = torch.arange(grid, dtype=torch.float32)
        return torch.stack([(weights.view(-1, grid, grid) * coords).sum((1, 2)),
                            (weights.view(-1, grid, grid) * coords[:, None]).sum((1, 2))], -1)

    res = compare({"ours": lambda: soft_argmax(src, dst, index, 11, 0.02, outside="zero")[0], "dense": dense}, repeats)
    return {"ours_s": res["ours"][0], "dense_s": res["dense"][0], "ratio": res["dense"][0] / res["ours"][0],
            "max_abs_difference": float((res["ours"][2] - res["dense"][2]).abs().max())}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    if args.engine:
        sd_path, sd_model = args.engine, str(args.engine)
    else:
        from cleandift_rt.models import write_tiny_base

        sd_path, sd_model = write_tiny_base(work / "tiny-sd", seed=0), "tiny SD 2.1-topology U-Net (random weights)"
    engine = Engine(sd_path, base=args.base, size=(args.sd_crop or args.sd_size,) * 2)
    nn_engine = Engine(sd_path, base=args.base, size=(args.nn_size, args.nn_size), taps=["us6"])
    src, trg, pts = spair_pair()
    rows = []
    peers = {"refine": refine_peer(args.repeats)}
    for kind in args.dino:
        dino = Dinov2Features(write_dino(kind, work), size=args.dino_size)
        peers[f"dino_{kind}"] = dino_peer(dino, args.repeats if kind == "tiny" else 1)
        fns = {"nn": lambda: nn_pair(nn_engine, src, trg, pts)}
        for name in ("tale", "tlfr"):
            recipe = replace(RECIPES[name], sd_size=args.sd_size, sd_crop=args.sd_crop or None, dino_size=args.dino_size)
            fns[name] = _pair_runner(Fusion(recipe, engine, dino), src, trg, pts)
        # round-robin after one warm-up call each: on shared cores load changes hit every recipe alike
        res = compare(fns, args.repeats if kind == "tiny" else 1)
        for name, (seconds, mem, _) in res.items():
            rows.append({"recipe": name, "dino": None if name == "nn" else kind, "seconds_per_pair": seconds,
                         "peak_extra_mb": mem, "over_nn": seconds / res["nn"][0]})
    return {"rows": rows, "peers": peers, "sd_model": sd_model, "sd_size": args.sd_size, "sd_crop": args.sd_crop,
            "dino_size": args.dino_size, "nn_size": args.nn_size}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny DINOv2 only")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many rounds after the warm-up (ViT-B: 1)")
    parser.add_argument("--engine", help="SD side: an engine file (default: the tiny SD 2.1-topology model)")
    parser.add_argument("--base", help="base model folder for a student --engine")
    parser.add_argument("--sd-size", type=int, default=960)
    parser.add_argument("--sd-crop", type=int, default=512, help="0: one pass")
    parser.add_argument("--dino-size", type=int, default=840)
    parser.add_argument("--nn-size", type=int, default=768, help="the nn recipe's engine size (DIFT protocol)")
    args = parser.parse_args(argv)
    args.dino = ["tiny"] if args.quick else ["tiny", "vitb"]
    info = machine()
    print_machine(info)
    result = run(args)
    for r in result["rows"]:
        print(f"{r['recipe']:<5} DINOv2 {r['dino'] or '-':<5} {r['seconds_per_pair']:8.2f} s per pair "
              f"({r['over_nn']:.2f}x nn, peak +{r['peak_extra_mb']:.0f} MB)")
    for name, p in result["peers"].items():
        other = "transformers" if name.startswith("dino") else "dense"
        print(f"{name}: ours {p['ours_s'] * 1e3:.1f} ms vs {other} {p[f'{other}_s'] * 1e3:.1f} ms: x{p['ratio']:.2f} "
              f"(max |difference| {p['max_abs_difference']:.2e})")
    result.update(machine=info, quick=args.quick)
    print(f"written {write_json('fusion', result)}")


if __name__ == "__main__":
    main()
