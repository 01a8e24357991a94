"""An engine whose features are informative without any model: zero-mean local colour patches.

Each cell of the map (``STRIDE`` pixels) holds two 7 x 7 neighbourhoods of the image, per colour
channel, each minus its mean and scaled to unit length: one of ``STRIDE``-pixel blocks (detail)
and one of ``4 * STRIDE``-pixel blocks (context, so repeated detail is told apart). The cosine of
two cells is then a normalised cross-correlation, and a patch is found again wherever the image
content moved. It has the Engine's face the Tracker uses (``extract``, ``size``, ``resize``,
``taps``), counts its calls and batch sizes, and can be made slow (``delay`` seconds per call).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cleandift_rt.features.preprocess import prepare_images

STRIDE = 2
PATCH = 7


def _patches(pixels: torch.Tensor, block: int, out_hw) -> torch.Tensor:
    blocks = F.avg_pool2d(pixels, block)
    b, c, h, w = blocks.shape
    p = F.unfold(F.pad(blocks, [PATCH // 2] * 4, mode="replicate"), PATCH).view(b, c, PATCH * PATCH, h, w)
    p = F.normalize((p - p.mean(2, keepdim=True)).reshape(b, c * PATCH * PATCH, h, w), dim=1)
    return p if (h, w) == tuple(out_hw) else F.interpolate(p, size=out_hw, mode="bilinear", align_corners=False)


class InformativeEngine:
    def __init__(self, size: int = 256, taps=("us6",), delay: float = 0.0):
        self.size, self.resize, self.taps, self.delay = (size, size), "stretch", tuple(taps), delay
        self.calls, self.batches = 0, []

    def extract(self, images, taps=None, **text):
        pixels = prepare_images(images, self.size, self.resize).pixels
        self.calls += 1
        self.batches.append(len(pixels))
        if self.delay:
            time.sleep(self.delay)
        hw = (self.size[0] // STRIDE, self.size[1] // STRIDE)
        feats = torch.cat([_patches(pixels, STRIDE, hw), _patches(pixels, 4 * STRIDE, hw)], dim=1)
        return {t: feats for t in (taps or self.taps)}


def texture_photo(seed: int, size: int = 640):
    """A photo whose every patch is distinct: smooth colour noise at three scales (uint8 H x W x 3)."""
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, size, size)
    for cells, weight in ((8, 1.0), (32, 0.7), (128, 0.5)):
        noise = torch.rand(1, 3, cells, cells, generator=gen)
        image += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    image = (image - image.amin()) / (image.amax() - image.amin())
    return (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
