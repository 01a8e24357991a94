"""The torch-hub DINOv2 checkpoints (facebookresearch/dinov2: ViT-S/14, B/14, L/14, g/14) converted on
load into a transformers ``Dinov2Model`` of this transformers version.

Hub key names (``vision_transformer.DinoVisionTransformer``): ``cls_token``, ``mask_token``,
``pos_embed`` ``[1, 1 + 37 * 37, D]``, ``patch_embed.proj.{weight,bias}``, per block ``i``
``blocks.{i}.norm1|norm2.{weight,bias}``, ``blocks.{i}.attn.qkv.{weight,bias}`` (query, key, value
stacked in that order), ``blocks.{i}.attn.proj.{weight,bias}``, ``blocks.{i}.ls1|ls2.gamma``,
``blocks.{i}.mlp.fc1|fc2.{weight,bias}`` (ViT-S/B/L) or ``blocks.{i}.mlp.w12|w3.{weight,bias}``
(ViT-g: SwiGLU, ``w12`` = gate then value), and ``norm.{weight,bias}``. The architecture is read
from the tensor shapes (every hub model has 64-dimensional heads).
"""

from __future__ import annotations

import math

import torch

HEAD_DIM = 64


def is_hub_state_dict(state: dict) -> bool:
    return "pos_embed" in state and "patch_embed.proj.weight" in state


def hub_config(state: dict):
    """The ``Dinov2Config`` of a hub state dict (docs/method.md, zero-shot fusion: layer_norm_eps 1e-6, layerscale, qkv bias)."""
    from transformers import Dinov2Config

    if any(k.startswith("register_tokens") for k in state):
        raise ValueError("this is a DINOv2 checkpoint with register tokens (dinov2_vit*14_reg); only the plain "
                         "ViT-S/14, B/14, L/14 and g/14 checkpoints are supported")
    hidden = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    positions = int(state["pos_embed"].shape[1]) - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"pos_embed holds {positions} patch positions, not a square grid: not a DINOv2 hub checkpoint")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith(".norm1.weight")})
    if depth == 0 or hidden % HEAD_DIM:
        raise ValueError(f"not a DINOv2 hub checkpoint: {depth} blocks, width {hidden}")
    swiglu = "blocks.0.mlp.w12.weight" in state
    return Dinov2Config(image_size=side * patch, patch_size=patch, hidden_size=hidden, num_hidden_layers=depth,
                        num_attention_heads=hidden // HEAD_DIM, mlp_ratio=4, layer_norm_eps=1e-6,
                        layerscale_value=1.0, qkv_bias="blocks.0.attn.qkv.bias" in state, use_swiglu_ffn=swiglu,
                        use_mask_token="mask_token" in state)


# transformers renamed DINOv2's modules in 5.x; the hub tensors go to whichever names the installed one uses
LEGACY_NAMES = {"q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value",
                "o_proj": "output.dense", "down_proj": "weights_out"}


def hub_to_transformers(state: dict, config, target_keys=()) -> dict[str, torch.Tensor]:
    """Hub tensors renamed (and the fused qkv / w12 split) into the names of ``target_keys`` (the
    ``state_dict`` keys of the installed transformers' ``Dinov2Model``: 5.x names, or 4.x ones)."""
    legacy = "encoder.layer.0.attention.attention.query.weight" in set(target_keys)
    name = (lambda n: LEGACY_NAMES.get(n, n)) if legacy else (lambda n: n)  # noqa: E731
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    if "mask_token" in state:
        out["embeddings.mask_token"] = state["mask_token"].reshape(1, -1)
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "mask_token"}
    for i in range(config.num_hidden_layers):
        hub, ours = f"blocks.{i}.", f"encoder.layer.{i}."
        renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": f"attention.{name('o_proj')}"}
        renames.update({"mlp.w3": f"mlp.{name('down_proj')}"} if config.use_swiglu_ffn
                       else {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
        for src, dst in renames.items():
            for kind in ("weight", "bias"):
                out[f"{ours}{dst}.{kind}"] = state[f"{hub}{src}.{kind}"]
                used.add(f"{hub}{src}.{kind}")
        out[f"{ours}layer_scale1.lambda1"] = state[f"{hub}ls1.gamma"]
        out[f"{ours}layer_scale2.lambda1"] = state[f"{hub}ls2.gamma"]
        used |= {f"{hub}ls1.gamma", f"{hub}ls2.gamma"}
        for kind in ("weight", "bias"):
            key = f"{hub}attn.qkv.{kind}"
            if key in state:
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), state[key].chunk(3, dim=0)):
                    out[f"{ours}attention.{name(proj)}.{kind}"] = part
                used.add(key)
            if config.use_swiglu_ffn:
                w12 = state[f"{hub}mlp.w12.{kind}"]
                if legacy:  # 4.x keeps the fused gate + value matrix
                    out[f"{ours}mlp.weights_in.{kind}"] = w12
                else:
                    out[f"{ours}mlp.gate_proj.{kind}"], out[f"{ours}mlp.up_proj.{kind}"] = w12.chunk(2, dim=0)
                used.add(f"{hub}mlp.w12.{kind}")
    unknown = sorted(set(state) - used)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise ValueError(f"unexpected keys in the DINOv2 hub checkpoint: {shown}")
    return {k: v.contiguous() for k, v in out.items()}
