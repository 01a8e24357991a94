"""Test helper: write a diffusers-format tiny model as an original (CompVis/LDM) single file.

The inverse of the conversion ``load_base`` applies to single files, written from the LDM layout
(``input_blocks`` / ``middle_block`` / ``output_blocks``, ``first_stage_model``, OpenCLIP
``resblocks``), so the single-file path is tested on files shaped like the real ones.
"""

from __future__ import annotations

import re

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_key(k: str) -> str:
    head, _, leaf = k.rpartition(".")
    for src, dst in _UNET_TOP.items():
        if head == src:
            return f"{dst}.{leaf}"
    if m := re.match(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", k):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}.{_resnet_rest(rest, kind)}"
    if m := re.match(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.*)", k):
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.*)", k):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}.{_resnet_rest(rest, kind)}"
    if m := re.match(r"up_blocks\.(\d)\.upsamplers\.0\.(.*)", k):
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.{m[2]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", k):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2], 'resnets')}"
    raise KeyError(k)


def _resnet_rest(rest: str, kind: str) -> str:
    if kind != "resnets":
        return rest
    for src, dst in _RESNET:
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def _vae_key(k: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)", r"encoder.down.\1.block.\2", k)
    k = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
    k = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)", lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}", k)
    k = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: f"decoder.up.{3 - int(m[1])}.upsample", k)
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    if "mid_block.attentions.0." in k:
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for src, dst in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f".{src}.", f".{dst}.")
        if v.ndim == 2:  # LDM stores these projections as 1x1 convolutions
            v = v[:, :, None, None]
    return k, v


def _openclip(text_state: dict[str, torch.Tensor], extra_layer: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in text_state.items():
        k = k.replace("text_model.", "", 1)
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", k):
            base, rest = f"transformer.resblocks.{m[1]}.", m[2]
            if p := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(base + "attn.in_proj_" + p[2], {})[p[1]] = v
                continue
            for src, dst in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                rest = rest.replace(src, dst)
            out[base + rest] = v
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if extra_layer:  # real SD 2.x files hold the last OpenCLIP layer, which SD does not use
        n = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{n - 1}.")]:
            out[k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn_like(out[k])
    out["text_projection"] = torch.randn(out["ln_final.weight"].shape[0], out["ln_final.weight"].shape[0])
    return out


def to_ldm_state_dict(base) -> dict[str, torch.Tensor]:
    state = {"model.diffusion_model." + _unet_key(k): v for k, v in base.unet.state_dict().items()}
    for k, v in base.vae.state_dict().items():
        k, v = _vae_key(k, v)
        state["first_stage_model." + k] = v
    # Files on disk always say text_model.*, whatever the installed transformers calls the keys.
    text = {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in base.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    if base.unet.config.use_linear_projection:  # SD 2.x: OpenCLIP layout
        state.update({"cond_stage_model.model." + k: v for k, v in _openclip(text, extra_layer=True).items()})
    else:
        state.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    return {k: v.contiguous() for k, v in state.items()}
