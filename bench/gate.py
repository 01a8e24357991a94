"""GATE's cost: each technique's extra time per image over the plain noisy baseline, same model, same run.

Every contender extracts one image with ``cleandift_rt.gate.GateExtractor`` (VAE encode, noising,
U-Net calls, feature assembly on the grid) and is timed round-robin against the others
(bench/_common.compare: best of --repeats). The baseline is the paper's: one U-Net call at t = 50
with a simple prompt, conv features. Contenders:

  prompt            the fine-grained SPair prompt (text embeddings cached per prompt, as across a dataset)
  lora-adapter      a rank-64 LoRA (alpha 32) on every attention projection, as a peft adapter (unmerged)
  lora-merged       the same LoRA merged into a U-Net folder
  controlnet        ControlNet on the image's Canny edges, one U-Net call
  controlnet-60-50  ControlNet with multi-step denoising from t = 60 (11 U-Net + 11 ControlNet calls)
  attention         the cross-attention probability features (explicit softmax on 6 layers)
  paper-bucket      the whole SPair bucket per image: 6 conv features + 1 attention feature

Models have random weights with the real topologies (never downloaded): ``--model sd15`` writes an
SD 1.5-size model, a ControlNetModel.from_unet of it and the LoRA once to --cache.

    python bench/gate.py --quick                  # tiny model at 128 px (seconds; proves the script)
    python bench/gate.py --model sd15 --size 512  # SD 1.5 size at 512 px: the numbers for docs/gate.md
Writes bench/results/gate-<time>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_description() -> dict:
    """CPU model name and the SIMD flags that decide fp32 / bf16 speed (from /proc/cpuinfo)."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"model": name, "flags": [f for f in wanted if f in flags]}


def ensure_models(variant: str, cache: Path) -> dict:
    """A base model folder, a ControlNet folder, a LoRA file and the merged U-Net (written once)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from cleandift_rt.models import load_base, write_random_base

    folder = cache / variant
    paths = {"base": folder / "base", "controlnet": folder / "controlnet", "merged": folder / "merged",
             "lora": folder / "lora" / "pytorch_lora_weights.safetensors"}
    if (folder / "done").is_file():
        return paths
    print(f"writing random {variant} models to {folder} (once)", flush=True)
    write_random_base(paths["base"], variant)
    base = load_base(paths["base"])
    controlnet = ControlNetModel.from_unet(base.unet)
    with torch.no_grad():  # trained ControlNets have non-zero output convolutions: same cost, real residuals
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.normal_(0, 0.01)
    controlnet.save_pretrained(paths["controlnet"], safe_serialization=True)
    lora_unet = copy.deepcopy(base.unet)
    lora_unet.add_adapter(LoraConfig(r=64, lora_alpha=32, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(paths["lora"].parent, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(lora_unet)))
    lora_unet.fuse_lora()
    lora_unet.unload_lora()
    lora_unet.save_pretrained(paths["merged"], safe_serialization=True)
    (folder / "done").write_text("ok\n")
    return paths


def contenders(paths: dict, size: int):
    from cleandift_rt.assets import load_photo
    from cleandift_rt.gate import GateExtractor, GateRecipe
    from cleandift_rt.gate.recipe import SPAIR_PROMPT
    from cleandift_rt.models import load_base

    base = load_base(paths["base"])
    ex = GateExtractor(base, size=size, controlnets={"canny": paths["controlnet"]},
                       loras={"adapter": paths["lora"], "merged": paths["merged"]})
    image = load_photo("cat")
    simple = "a photo"
    recipes = {
        "baseline": GateRecipe(prompt=simple),
        "prompt": GateRecipe(prompt=SPAIR_PROMPT),
        "lora-adapter": GateRecipe(prompt=simple, lora="adapter"),
        "lora-merged": GateRecipe(prompt=simple, lora="merged"),
        "controlnet": GateRecipe(prompt=simple, controlnet="canny"),
        "controlnet-60-50": GateRecipe(prompt=simple, controlnet="canny", t_start=60),
    }
    fns = {name: (lambda r=r: ex.features(image, r)) for name, r in recipes.items()}
    fns["attention"] = lambda: ex.features(image, GateRecipe(prompt=simple), kind="attention")
    bucket_conv = [GateRecipe(prompt=SPAIR_PROMPT, seed=0), GateRecipe(prompt=SPAIR_PROMPT, seed=1),
                   GateRecipe(prompt=simple, lora="adapter"), GateRecipe(prompt=simple, lora="merged"),
                   GateRecipe(prompt=simple, controlnet="canny", t_start=60, seed=0),
                   GateRecipe(prompt=simple, controlnet="canny", t_start=60, seed=1)]
    attention = GateRecipe(prompt=SPAIR_PROMPT, controlnet="canny", lora="adapter", t_start=60)
    fns["paper-bucket"] = lambda: ([ex.features(image, r) for r in bucket_conv],
                                   ex.features(image, attention, kind="attention"))
    return fns, ex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model at 128 px, 1 repeat")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up (best is kept)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "cache" / "gate",
                        help="random-weight models (written once)")
    args = parser.parse_args()
    if args.quick:
        args.model, args.size, args.repeats = "tiny", 128, 1
    paths = ensure_models(args.model, args.cache)
    fns, ex = contenders(paths, args.size)
    results = compare(fns, args.repeats)
    baseline = results["baseline"][0]
    rows = []
    print(f"{args.model} at {args.size} px, {torch.get_num_threads()} threads; best of {args.repeats} round(s)")
    print(f"{'contender':<18} {'s / image':>10} {'extra s':>9} {'x baseline':>11} {'peak MB':>8}")
    for name, (seconds, peak_mb, _) in results.items():
        rows.append({"contender": name, "seconds": seconds, "extra_seconds": seconds - baseline,
                     "ratio_to_baseline": seconds / baseline, "peak_extra_mb": peak_mb})
        print(f"{name:<18} {seconds:>10.3f} {seconds - baseline:>+9.3f} {seconds / baseline:>11.2f} {peak_mb:>8.0f}")
    result = {"model": args.model, "size": args.size, "repeats": args.repeats, "rows": rows,
              "cpu": cpu_description(), "machine": machine(), "device": str(ex.device)}
    print(f"written {write_json('gate', result)}")


if __name__ == "__main__":
    main()
