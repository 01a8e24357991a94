"""Helpers of the fast-encoder tests: smooth synthetic photos and fast-encoder folders made without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH = 8  # encoder channels of the tests' fast encoders (TAESD: 64)


def write_blob_images(folder: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """``count`` PNG images of a few soft colour blobs on a plain ground (what a small encoder can learn
    from few examples, unlike stripes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        img = np.zeros((size, size, 3)) + rng.uniform(0, 255, 3)
        for _ in range(4):
            cy, cx, r = *rng.uniform(0, 1, 2), rng.uniform(0.1, 0.3)
            img += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-200, 200, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"blob{i:02d}.png")
    return folder


def write_encoder(folder: Path, base, seed: int = 0, latent_channels: int = 4, **base_fields) -> Path:
    """An untrained fast encoder recorded as imitating ``base``'s VAE (``base_fields`` override that record)."""
    from cleandift_rt.models.fast_encoder import base_reference, new_autoencoder, save_fast_encoder

    model = new_autoencoder(latent_channels, width=WIDTH, seed=seed)
    return save_fast_encoder(folder, model, {"base": {**base_reference(base), **base_fields}, "init": None})


def write_raw_autoencoder(folder: Path, source: Path, **config) -> Path:
    """``source``'s AutoencoderTiny as a plain diffusers folder (no record): what public TAESD weights look like;
    ``config`` changes its config (``scaling_factor=5.49``: latents on another scale)."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny.from_pretrained(source, local_files_only=True)
    model.register_to_config(**config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
