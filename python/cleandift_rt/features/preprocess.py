"""Turn what users pass (PIL images, uint8 HWC arrays, float NCHW arrays/tensors) into model input.

Every backend goes through this one function, so all of them see the same pixels. Two size
policies: ``stretch`` (resize to the model size ignoring aspect, as DIFT and the SPair protocol
do) and ``pad`` (keep aspect, fit the longer side, pad bottom/right with mid-grey); the returned
geometry maps feature/pixel coordinates back to each original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import regular_file
from ..checks import check_size, limit

MIN_SIDE = 64
SIZE_MULTIPLE = 64
RESIZE_POLICIES = ("stretch", "pad")
_FLOAT_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where an original ``height x width`` image sits inside the model input."""

    height: int
    width: int
    scale_y: float  # model pixels per original pixel
    scale_x: float
    content_height: int  # model pixels covered by the image (the rest is padding)
    content_width: int


@dataclass
class Prepared:
    pixels: torch.Tensor  # B x 3 x H x W, float32 in [-1, 1]
    geometry: list[Geometry]


def check_model_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from one side or two: integers (never a bool or a fraction), positive multiples of 64."""
    sides = [size, size] if not isinstance(size, (Sequence, np.ndarray, torch.Tensor)) else list(size)
    if len(sides) != 2:
        raise ValueError(f"model input size must be (H, W) or one side, got {size!r:.40}")
    h, w = (check_size(s, f"model input size {sides!r:.40}: each side") for s in sides)
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"model input size {h}x{w} must be positive multiples of {SIZE_MULTIPLE} "
                         "(the U-Net downsamples by 64 in total)")
    return h, w


def check_policy(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}: use one of {', '.join(RESIZE_POLICIES)}")
    return policy


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def rgb8(image, source: str = "image"):
    """Any Pillow image as 8-bit RGB, or a ValueError naming its mode.

    16-bit modes (``I;16*``, and ``I`` holding values above 255, up to 65535: how TIFF decodes 16-bit
    grey) are scaled to 8 bits (``x / 257``) instead of being clipped, which turns them nearly white;
    mode ``I`` holding 0..255 only (8-bit grey stored in 32 bits, as ``convert("I")`` makes it) is
    taken as it is (scaled as 16-bit it turned nearly black); float
    images (``F``) in [0, 1] are scaled by 255, other float ranges are refused (their meaning is
    unknown); palette, alpha, CMYK, YCbCr, LAB and HSV images go through Pillow's own RGB
    conversion (alpha dropped, as Pillow does).
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{source}: integer pixels outside 0..65535 (mode {mode}): save it as 8- or 16-bit RGB "
                             "or greyscale")
        eight_bit = mode == "I" and (not values.size or values.max() <= 255)
        grey = (values if eight_bit else (values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"{source}: floating-point pixels (mode F) with values in [{np.nanmin(values):.3g}, "
                             f"{np.nanmax(values):.3g}]: only [0, 1] has a known meaning; save 8- or 16-bit images")
        grey = np.round(values * 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{source}: Pillow cannot convert mode {mode} to RGB ({exc}): save it as RGB") from None


def _target_geometry(h: int, w: int, size: tuple[int, int], policy: str) -> Geometry:
    th, tw = size
    if policy == "stretch":
        return Geometry(h, w, th / h, tw / w, th, tw)
    scale = min(th / h, tw / w)
    ch, cw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
    return Geometry(h, w, ch / h, cw / w, ch, cw)


def _check_side(h: int, w: int, index: int) -> None:
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image {index} is {w}x{h} pixels: images must be at least {MIN_SIDE} px on each side")


def _uint8_to_tensor(arr: np.ndarray, index: int, size, policy) -> tuple[torch.Tensor, Geometry]:
    from PIL import Image

    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image {index}: uint8 arrays must be H x W x 3 RGB, got shape {arr.shape}"
                         + (" (convert grayscale/RGBA to RGB first)" if arr.ndim == 3 or arr.ndim == 2 else ""))
    h, w = arr.shape[:2]
    _check_side(h, w, index)
    geo = _target_geometry(h, w, size, policy)
    img = Image.fromarray(np.ascontiguousarray(arr))
    if (geo.content_height, geo.content_width) != (h, w):
        img = img.resize((geo.content_width, geo.content_height), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return _pad(t, size), geo


def _pad(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    th, tw = size
    _, h, w = t.shape
    if (h, w) == (th, tw):
        return t
    return F.pad(t, (0, tw - w, 0, th - h), value=0.0)  # 0 is mid-grey in [-1, 1]


def _float_batch(x: torch.Tensor, size, policy) -> tuple[torch.Tensor, list[Geometry]]:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be B x 3 x H x W (NCHW, RGB, in [-1, 1]), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    h, w = x.shape[2:]
    _check_side(h, w, 0)
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _FLOAT_RANGE_SLACK or hi > 1 + _FLOAT_RANGE_SLACK:
        raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(for [0, 1] images use x * 2 - 1; for 0..255 pass uint8 arrays instead)")
    geo = _target_geometry(h, w, size, policy)
    if (geo.content_height, geo.content_width) != (h, w):
        x = F.interpolate(x, size=(geo.content_height, geo.content_width), mode="bicubic",
                          align_corners=False, antialias=True).clamp_(-1, 1)
    x = torch.stack([_pad(img, size) for img in x])
    return x, [geo] * x.shape[0]


def prepare_images(images, size: int | Sequence[int], policy: str = "stretch") -> Prepared:
    """Validate ``images`` and return model input ``B x 3 x H x W`` float32 in [-1, 1] on the CPU."""
    size = check_model_size(size)
    check_policy(policy)
    if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.dtype.kind == "f"):
        x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
        if x.device.type == "meta":
            raise ValueError("images are on the meta device (shapes only, no data): move real pixels to the CPU or "
                             "a GPU first")
        if not x.dtype.is_floating_point:
            raise TypeError(f"tensor images must be floating point NCHW in [-1, 1], got dtype {x.dtype} "
                            "(pass uint8 images as H x W x 3 numpy arrays)")
        pixels, geometry = _float_batch(x, size, policy)
        return Prepared(pixels, geometry)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 H x W x 3 (or N x H x W x 3) or float NCHW in [-1, 1], "
                            f"got dtype {images.dtype}")
        if images.ndim == 4:
            images = list(images)
        elif images.ndim == 3:
            images = [images]
        else:
            raise ValueError(f"uint8 images must be H x W x 3 or N x H x W x 3, got shape {images.shape}")
    if _is_pil(images):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"unsupported image batch type {type(images).__name__}: pass a list of PIL images, uint8 "
                        "H x W x 3 numpy arrays, or a float NCHW array/tensor in [-1, 1]")
    if len(images) == 0:
        raise ValueError("empty batch: pass at least one image")
    tensors, geometry = [], []
    for i, img in enumerate(images):
        if _is_pil(img):
            try:
                img = np.asarray(rgb8(img, f"image {i}"))
            except (AssertionError, OSError) as exc:  # Pillow's errors for a file closed before it was loaded
                raise ValueError(f"image {i}: the PIL image cannot be read ({type(exc).__name__}: {exc}): its file was "
                                 "closed before the pixels were loaded; call image.load() (or .copy()) inside the "
                                 "`with Image.open(...)` block") from None
        if isinstance(img, torch.Tensor) or (isinstance(img, np.ndarray) and img.dtype.kind == "f"):
            raise TypeError(f"image {i}: float images go in one NCHW array/tensor, not in a list")
        if not isinstance(img, np.ndarray):
            raise TypeError(f"image {i} has unsupported type {type(img).__name__}: use PIL images or uint8 numpy arrays")
        if img.dtype != np.uint8:
            raise TypeError(f"image {i}: numpy images must be uint8 H x W x 3, got dtype {img.dtype}")
        t, geo = _uint8_to_tensor(img, i, size, policy)
        tensors.append(t)
        geometry.append(geo)
    return Prepared(torch.stack(tensors), geometry)


def load_image(path, exif_orientation: bool = True):
    """Decode an image file fully, as RGB, upright as viewers show it (EXIF orientation applied).

    ``exif_orientation=False`` keeps the stored pixel layout (annotations such as SPair's keypoints
    refer to it). Undecodable or truncated files raise a ValueError naming the file.
    """
    from pathlib import Path

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = regular_file(path, "image")  # a folder, a FIFO (opening it would block) or a dangling link: named
    try:
        with Image.open(path) as im:
            pixels, most = im.width * im.height, limit("MAX_IMAGE_PIXELS")
            if pixels > most:  # before decoding: a 410 KB PNG can declare 12000 x 12000 (1.7 GB decoded)
                raise ValueError(f"image {path} is {im.width}x{im.height} ({pixels / 1e6:.0f} MP), over the "
                                 f"{most / 1e6:.0f} MP limit for one image: shrink it, or raise "
                                 "CLEANDIFT_MAX_IMAGE_PIXELS (docs/reliability.md)")
            im.load()
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            return rgb8(im, f"image {path}")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from None


def batch_size_of(images) -> int:
    """Number of images in a batch, without preparing it (for splitting into chunks)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return 1 if (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3) else len(images)
    if _is_pil(images):
        return 1
    return len(images)
