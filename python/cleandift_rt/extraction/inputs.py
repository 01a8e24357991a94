"""What an extraction run works on: the images (a stable key and a source path each), the facts
that make two runs' features interchangeable (``RunConfig``: taps, sizes, precision, prompt, and
the content digests of the engine and of the base model it reads), and the decoding of one image
into model input together with the digest of the bytes it was decoded from.

Digests are ``checkpoint.content_digest``: size and a BLAKE2b digest of the first and last 64 KiB
of each file (the whole file up to 128 KiB); inputs add their modification time, so an image
edited in place is extracted again; engines and base models do not, so a copied engine still
resumes its folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import content_digest, short_hash

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
    engine: str  # the engine file's name (informative: engine_digest identifies it)
    engine_digest: str  # content digest of the engine (and its base model and derived-output files)
    prompt: str  # the prompt the engine runs with (baked into exports)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(taps=list(self.taps), input_size=list(self.input_size),
                 shapes={t: list(s) for t, s in self.shapes.items()})
        return d

    def identity(self) -> str:
        """One hash of everything that changes the features: written into every output, so an output
        found on disk is taken only when this run made it."""
        d = self.to_dict()
        return short_hash(*(f"{k}={d[k]}" for k in sorted(d) if k != "engine"))

    def bytes_per_image(self) -> int:
        return 4 * sum(int(np.prod(s)) for s in self.shapes.values())


def engine_digest(engine_path, base=None, files=()) -> str:
    """The content identity of an engine: its file (a folder: every file), an ``.onnx``'s external
    ``<name>.data`` beside it, the base model a student file reads (``base``) and the files of the
    outputs derived in PyTorch (an aggregator)."""
    path = Path(engine_path)
    parts = [f"engine={content_digest(path)}"]
    data = path.with_name(path.name + ".data")
    if path.suffix == ".onnx" and data.is_file():
        parts.append(f"data={content_digest(data)}")
    if base is not None and Path(base).exists():
        parts.append(f"base={content_digest(base)}")
    parts += [f"derived={content_digest(f)}" for f in files]
    return short_hash(*parts)


def run_config(fmt: str, shapes: dict, size, resize: str, precision: str | None, engine_path, *, base=None,
               prompt: str = "", derived_files=()) -> RunConfig:
    """``shapes``: ``{tap: (C, h, w)}`` of every tap to write, in order; ``base``: the base model a
    student engine reads; ``derived_files``: files of outputs computed from taps (an aggregator)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    h, w = size
    return RunConfig(fmt, tuple(shapes), {t: [int(v) for v in s] for t, s in shapes.items()}, (int(h), int(w)), resize,
                     precision or "fp32", Path(engine_path).name, engine_digest(engine_path, base, derived_files),
                     prompt or "")


def input_digest(path) -> str:
    """What an image file holds now (size, modification time, first and last 64 KiB)."""
    return content_digest(path, mtime=True)


def collect_images(inputs) -> list[Item]:
    """Items for files and folders (searched recursively); keys are paths relative to the folder
    given (a file given by itself: its name), so a run resumes from any working directory."""
    found: list[Item] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            # not only regular files: a FIFO or a dangling link named x.jpg is an input that fails, counted
            files = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.is_dir())
            found.extend(Item(f.relative_to(p).as_posix(), str(f)) for f in files)
        elif p.exists() or p.is_symlink():
            found.append(Item(p.name, str(p)))
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


def decode_input(path: str, size: tuple[int, int], resize: str) -> tuple[np.ndarray, tuple[int, int], str]:
    """``decode`` plus the image's ``input_digest``, taken first: a file replaced while it is decoded
    leaves a digest that no longer matches, so the next run extracts it again."""
    digest = input_digest(path)
    pixels, size_wh = decode(path, size, resize)
    return pixels, size_wh, digest
