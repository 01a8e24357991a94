"""What an extraction run works on: the images (a stable key and a source path each), the engine
facts every output records (``RunConfig``), and the decoding of one image into model input."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FORMATS = ("safetensors", "npz", "shards")
# What an image that cannot become model input raises (load_image / prepare_images name the file)
DECODE_ERRORS = (ValueError, TypeError, OSError)


@dataclass(frozen=True)
class Item:
    """One image: ``key`` identifies it in the manifest and names its per-image output
    (``sub/a.jpg`` -> ``sub/a.jpg.safetensors``); ``path`` is where it is read from."""

    key: str
    path: str


@dataclass(frozen=True)
class RunConfig:
    """The facts that make two runs' features interchangeable; a resumed run must match them."""

    format: str
    taps: tuple[str, ...]
    shapes: dict  # {tap: [C, h, w]}
    input_size: tuple[int, int]
    resize: str
    precision: str
    engine: str  # the engine file's name
    engine_bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(taps=list(self.taps), input_size=list(self.input_size),
                 shapes={t: list(s) for t, s in self.shapes.items()})
        return d

    def bytes_per_image(self) -> int:
        return 4 * sum(int(np.prod(s)) for s in self.shapes.values())


def engine_bytes(path) -> int:
    """Size of an engine on disk (a folder: all its files): part of its identity in the manifest."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run_config(fmt: str, shapes: dict, size, resize: str, precision: str | None, engine_path) -> RunConfig:
    """``shapes``: ``{tap: (C, h, w)}`` of every tap to write, in order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    h, w = size
    return RunConfig(fmt, tuple(shapes), {t: [int(v) for v in s] for t, s in shapes.items()}, (int(h), int(w)), resize,
                     precision or "fp32", Path(engine_path).name, engine_bytes(engine_path))


def collect_images(inputs) -> list[Item]:
    """Items for files and folders (searched recursively); keys are paths relative to the folder
    given (a file given by itself: its name), so a run resumes from any working directory."""
    found: list[Item] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            found.extend(Item(f.relative_to(p).as_posix(), str(f)) for f in files)
        elif p.is_file():
            found.append(Item(p.name, str(p)))
        elif p.exists():
            raise ValueError(f"{p} is neither a file nor a folder")
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not found:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    seen: dict[str, str] = {}
    for item in found:
        if item.key in seen:
            raise ValueError(f"{seen[item.key]} and {item.path} would write the same output ({item.key}): pass one "
                             "folder holding both, or run them into different --out folders")
        seen[item.key] = item.path
    return found


def decode(path: str, size: tuple[int, int], resize: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Model input ``3 x H x W`` float32 in [-1, 1] and the original (width, height) of one image file.

    Raises one of ``DECODE_ERRORS`` with the file named when the image cannot be used."""
    from ..features.preprocess import load_image, prepare_images

    image = load_image(path)
    try:
        pixels = prepare_images([np.asarray(image)], size, resize).pixels[0]
    except DECODE_ERRORS as exc:
        raise type(exc)(f"image {path}: {exc}") from None
    return pixels.numpy(), (image.width, image.height)
