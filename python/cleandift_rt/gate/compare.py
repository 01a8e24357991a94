"""How much a technique suppresses content shift: the score (section 5.2) and the GATE guideline's picture.

:func:`content_shift_table` scores each technique's conv feature against the reference (the plain
recipe at t = 0), with the plain noisy baseline at the same t and seed as the anchor: 0 = no better
than no technique, 1 = contours as clean as at t = 0, below 0 = more shift than the baseline.

:func:`img2img_comparison` draws the qualitative check of the guideline (section 5.1): the input,
a reference img2img generation at high strength without any technique, and one generation per
technique with the same seed; a technique whose output stays closer to the input suppresses
content shift. It runs diffusers' img2img pipelines built from the local components of the base
model (VAE decoder and the scheduler of its folder), no hub, no safety checker.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch

from ..features.preprocess import prepare_images
from ..models.configs import SCHEDULER
from ..models.offline import diffusers
from .extract import GateExtractor
from .recipe import GateRecipe
from .score import laplacian_difference
from .techniques import canny_control, select_lora

BASELINE = "baseline (anchor)"


def content_shift_table(extractor: GateExtractor, image, techniques: Mapping[str, GateRecipe], t: int = 50,
                        seed: int = 0, prompt: str = "", category: str = "") -> list[dict]:
    """``[{technique, diff, score}]``: the anchor first (score 0), then each technique."""
    if extractor.student is not None:
        raise ValueError("the content-shift score compares noisy features with those at t = 0: it needs the noisy "
                         "baseline (no student)")
    plain = GateRecipe(prompt=prompt, t=t, seed=seed)
    reference = extractor.features(image, replace(plain, t=0), category)
    anchor_diff = laplacian_difference(extractor.features(image, plain, category), reference)
    if anchor_diff <= 0:
        raise ValueError(f"the baseline at t={t} has the same contours as at t=0: use a larger --t")
    rows = [{"technique": BASELINE, "recipe": plain.describe(), "diff": anchor_diff, "score": 0.0}]
    for name, recipe in techniques.items():
        diff = laplacian_difference(extractor.features(image, recipe, category), reference)
        rows.append({"technique": name, "recipe": recipe.describe(), "diff": diff, "score": 1.0 - diff / anchor_diff})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len(r["technique"]) for r in rows)
    lines = [f"{'technique':<{width}}  {'diff':>12}  {'score':>7}"]
    lines += [f"{r['technique']:<{width}}  {r['diff']:>12.4f}  {r['score']:>7.3f}" for r in rows]
    return "\n".join(lines)


def _scheduler(base_source: str):
    path = Path(base_source) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else dict(SCHEDULER, _class_name="DDIMScheduler")
    cls = getattr(diffusers(), config.get("_class_name", "DDIMScheduler"), None)
    if cls is None:
        raise ValueError(f"{path}: unknown scheduler class {config.get('_class_name')!r} for this diffusers version")
    return cls.from_config(config)


def _pipeline(extractor: GateExtractor, recipe: GateRecipe):
    base = extractor.base
    if base.text_encoder is None or base.tokenizer is None:
        raise ValueError(f"the img2img picture needs the base model's text encoder and tokenizer ({base.source} has none)")
    unet = extractor.unet_for(recipe)
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                 scheduler=_scheduler(base.source), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    lib = diffusers()
    if recipe.controlnet is not None:
        pipe = lib.StableDiffusionControlNetImg2ImgPipeline(controlnet=extractor.controlnets[recipe.controlnet], **parts)
    else:
        pipe = lib.StableDiffusionImg2ImgPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pil(pixels: torch.Tensor):
    """``1 x 3 x H x W`` in [-1, 1] -> PIL image."""
    from PIL import Image

    return Image.fromarray(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


@torch.no_grad()
def img2img(extractor: GateExtractor, image, recipe: GateRecipe, strength: float, steps: int, guidance: float,
            category: str = ""):
    """One img2img generation of ``image`` (resized to the extractor's size) with ``recipe``'s techniques."""
    if not 0 < strength <= 1:
        raise ValueError(f"img2img strength must lie in (0, 1], got {strength}")
    extractor.check(recipe)
    pixels = prepare_images([image], extractor.size, "stretch").pixels
    kwargs = dict(prompt=recipe.prompt_for(category), image=_pil(pixels), strength=strength,
                  num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(recipe.seed))
    if recipe.controlnet is not None:  # edges in {0, 1} -> the same picture in [-1, 1] for _pil
        kwargs.update(control_image=_pil(canny_control(pixels) * 2 - 1), controlnet_conditioning_scale=recipe.controlnet_scale)
    try:
        return _pipeline(extractor, recipe)(**kwargs).images[0]
    finally:
        select_lora(extractor.unet, None, 1.0)


def img2img_comparison(extractor: GateExtractor, image, techniques: Mapping[str, GateRecipe], *, strength: float = 0.8,
                       steps: int = 50, guidance: float = 1.0, seed: int = 0, prompt: str = "", category: str = ""):
    """The picture: input | reference img2img (no technique) | one img2img per technique, labelled."""
    panels = [("input", _pil(prepare_images([image], extractor.size, "stretch").pixels))]
    reference = GateRecipe(prompt=prompt, seed=seed)
    panels.append((f"reference (strength {strength:g})",
                   img2img(extractor, image, reference, strength, steps, guidance, category)))
    for name, recipe in techniques.items():
        panels.append((name, img2img(extractor, image, replace(recipe, seed=seed), strength, steps, guidance, category)))
    return _strip(panels)


def _strip(panels):
    """Panels side by side, each with its label underneath (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h = panels[0][1].size
    label_h = 40
    out = Image.new("RGB", (w * len(panels), h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, (label, img) in enumerate(panels):
        out.paste(img.convert("RGB").resize((w, h)), (i * w, 0))
        lines = textwrap.wrap(label, max(8, w // 7))[:2]  # the default font is about 6 px wide
        draw.multiline_text((i * w + 6, h + 6), "\n".join(lines), fill=(20, 20, 20), font=font)
    return out
