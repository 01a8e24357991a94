"""Model configurations as plain data: SD 1.5, SD 2.1 and a tiny model with the same topology.

The tiny configuration keeps everything that decides tap names and shapes (4 down / 4 up blocks,
``layers_per_block=2``, cross-attention in the first three down and last three up blocks, linear
projections as SD 2.1) and shrinks only widths, so tests exercise the real code paths in seconds.
"""

from __future__ import annotations

import copy

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], down_block_types=_DOWN, up_block_types=_UP,
                 attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False,
                 upcast_attention=False, norm_num_groups=32),
    "sd21": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], down_block_types=_DOWN, up_block_types=_UP,
                 attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                 upcast_attention=True, norm_num_groups=32),
    "tiny": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[32, 64, 64, 64], down_block_types=_DOWN, up_block_types=_UP,
                 attention_head_dim=[1, 2, 4, 4], cross_attention_dim=32, use_linear_projection=True,
                 upcast_attention=True, norm_num_groups=32),
}
# SD 1.5 topology at tiny width (no linear projection), for tests that both layouts tap alike.
UNET["tiny-sd15"] = dict(UNET["tiny"], use_linear_projection=False, upcast_attention=False, attention_head_dim=2)

_VAE_BLOCKS = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, scaling_factor=0.18215)
VAE = {
    "sd15": dict(_VAE_BLOCKS, block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=512),
    "sd21": dict(_VAE_BLOCKS, block_out_channels=[128, 256, 512, 512], norm_num_groups=32, sample_size=768),
    "tiny": dict(_VAE_BLOCKS, block_out_channels=[16, 16, 32, 32], norm_num_groups=8, sample_size=128),
}
VAE["tiny-sd15"] = VAE["tiny"]

TEXT_ENCODER = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=512, vocab_size=49408),
    # vocab_size is set from the byte-level tokenizer written beside it
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32),
}
TEXT_ENCODER["tiny-sd15"] = TEXT_ENCODER["tiny"]

# Both SD versions train with the same noise schedule (docs/method.md, training).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def unet_config(variant: str) -> dict:
    return copy.deepcopy(UNET[_check(variant)])


def vae_config(variant: str) -> dict:
    return copy.deepcopy(VAE[_check(variant)])


def text_encoder_config(variant: str) -> dict:
    return copy.deepcopy(TEXT_ENCODER[_check(variant)])


def _check(variant: str) -> str:
    if variant not in UNET:
        raise ValueError(f"unknown model variant {variant!r}: choose one of {', '.join(UNET)}")
    return variant
