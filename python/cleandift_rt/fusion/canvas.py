"""The square canvas both fusion recipes feed their models (docs/method.md, zero-shot fusion): the image resized so its
long side is the canvas size, centred, the rest zero (black), as "A Tale of Two Features" and
"Telling Left from Right" prepare their inputs; plus the map between original and canvas pixels.

Inputs follow ``Engine.extract``: a list of PIL images or uint8 ``H x W x 3`` arrays, a uint8
``N x H x W x 3`` array, or one float ``B x 3 x H x W`` array / tensor in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..features.preprocess import MIN_SIDE


@dataclass(frozen=True)
class Placement:
    """Where a ``width x height`` image sits on a ``size x size`` canvas."""

    width: int
    height: int
    size: int
    scale: float  # canvas pixels per original pixel
    content_width: int
    content_height: int
    offset_x: int
    offset_y: int

    def to_canvas(self, points) -> np.ndarray:
        """``[N, 2]`` (x, y) original pixels -> canvas pixels (one scale for both axes, as the references)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return p * self.scale + np.array([self.offset_x, self.offset_y])

    def from_canvas(self, points) -> np.ndarray:
        """``[N, 2]`` canvas pixels -> original pixels (the inverse of :meth:`to_canvas`)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return (p - np.array([self.offset_x, self.offset_y])) / self.scale


def placement(width: int, height: int, size: int) -> Placement:
    """The long side becomes ``size``, the short one ``round(size * short / long)``, centred (the
    offsets round down, as the reference implementations' ``(size - side) // 2``)."""
    scale = size / max(width, height)
    cw = size if width >= height else max(1, int(np.around(size * width / height)))
    ch = size if height >= width else max(1, int(np.around(size * height / width)))
    return Placement(width, height, size, scale, cw, ch, (size - cw) // 2, (size - ch) // 2)


def _pil_list(images) -> list | None:
    """``images`` as a list of RGB PIL images, or None when it is a float batch."""
    from PIL import Image

    if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.dtype.kind == "f"):
        return None
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise TypeError(f"numpy images must be uint8 H x W x 3 (or N x H x W x 3) or float NCHW in [-1, 1], "
                            f"got dtype {images.dtype} and shape {images.shape}")
        images = [images] if images.ndim == 3 else list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError("pass a non-empty list of PIL images or uint8 H x W x 3 arrays, or a float NCHW batch in [-1, 1]")
    out = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image {i}: arrays must be uint8 H x W x 3 RGB, got {img.dtype} {img.shape}")
            img = Image.fromarray(np.ascontiguousarray(img))
        elif not isinstance(img, Image.Image):
            raise TypeError(f"image {i} has unsupported type {type(img).__name__}: use PIL images or uint8 numpy arrays")
        out.append(img.convert("RGB"))
    return out


def _check_side(width: int, height: int, index: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image {index} is {width}x{height} pixels: images must be at least {MIN_SIDE} px on each side")


def square_canvas(images, size: int) -> tuple[torch.Tensor, list[Placement]]:
    """``B x 3 x size x size`` float32 in [0, 1] (black padding) and each image's placement.

    PIL / uint8 images are resized with Lanczos (as the reference implementations do), float
    batches with antialiased bicubic interpolation.
    """
    pils = _pil_list(images)
    canvas, places = [], []
    if pils is None:
        x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
            raise ValueError(f"float images must be a non-empty B x 3 x H x W batch in [-1, 1], got shape {tuple(x.shape)}")
        x = x.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")
        if float(x.min()) < -1.001 or float(x.max()) > 1.001:
            raise ValueError("float images must lie in [-1, 1] (for [0, 1] images pass x * 2 - 1)")
        h, w = x.shape[2:]
        _check_side(w, h, 0)
        p = placement(w, h, size)
        body = F.interpolate((x + 1) / 2, size=(p.content_height, p.content_width), mode="bicubic",
                             align_corners=False, antialias=True).clamp(0, 1)
        out = torch.zeros(x.shape[0], 3, size, size)
        out[:, :, p.offset_y:p.offset_y + p.content_height, p.offset_x:p.offset_x + p.content_width] = body
        return out, [p] * x.shape[0]
    from PIL import Image

    for i, img in enumerate(pils):
        _check_side(img.width, img.height, i)
        p = placement(img.width, img.height, size)
        body = img.resize((p.content_width, p.content_height), Image.LANCZOS)
        full = Image.new("RGB", (size, size))
        full.paste(body, (p.offset_x, p.offset_y))
        canvas.append(torch.from_numpy(np.asarray(full, dtype=np.float32) / 255.0).permute(2, 0, 1))
        places.append(p)
    return torch.stack(canvas), places


def flip_images(images):
    """The horizontal mirror of every image, in the same input form."""
    pils = _pil_list(images)
    if pils is None:
        return images.flip(-1) if isinstance(images, torch.Tensor) else np.ascontiguousarray(images[..., ::-1])
    from PIL import Image

    return [img.transpose(Image.FLIP_LEFT_RIGHT) for img in pils]
