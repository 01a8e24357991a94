"""The explorer's state while the page is open: the loaded images with their features (one engine
call per image, all taps at once), the recipes with the maps they derived, and the answers to clicks.

Everything the page sends is checked here and refused with an :class:`ExploreError`, whose message
the page shows (an unreadable or huge file, a click outside the image, a recipe the engine lacks).
One lock serialises the requests: the engine and the caches are not shared between threads.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..checks import limit
from ..features.preprocess import MIN_SIDE, Geometry, prepare_images, rgb8
from ..taps import DEFAULT_TAP, TAPS
from .pictures import data_url, heat_picture, pca_pictures
from .recipes import FusionRecipe, ProjectedRecipe, TapRecipe

MAX_IMAGES = 12  # each holds every tap of the engine (tens of MB at SD 2.1 size)
DISPLAY_SIDE = 768  # long side of the photo the page shows (clicks are mapped back to full resolution)
RECIPE_CACHE = 8  # recipes kept with their maps (switching back to one costs nothing)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ExploreError(ValueError):
    """Something the page sent that cannot be done; its message is shown on the page."""


@dataclass
class LoadedImage:
    id: int
    name: str
    image: Image.Image  # RGB, upright
    geometry: Geometry  # where it sits in the engine's input
    taps: dict  # every engine output, [C, h, w] float32
    display: bytes  # the JPEG the page shows
    seconds: float  # engine time


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes of an image file -> upright RGB, or an ExploreError naming the problem (``max_pixels``: checked
    from the header, before decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ExploreError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} MP): the explorer "
                                   f"takes images up to {max_pixels / 1e6:.0f} MP; scale it down first (or raise "
                                   "CLEANDIFT_MAX_IMAGE_PIXELS)")
            if min(width, height) < MIN_SIDE:
                raise ExploreError(f"{name} is {width} x {height} pixels: images need at least {MIN_SIDE} px on each side")
            im.load()
            return rgb8(ImageOps.exif_transpose(im), name)
    except Image.DecompressionBombError:
        raise ExploreError(f"{name} is too large to decode safely: the explorer takes images up to "
                           f"{max_pixels / 1e6:.0f} MP") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ExploreError(f"{name} is not an image the explorer can read (JPEG, PNG, WebP, BMP, TIFF): {exc}") from None
    except ExploreError:
        raise
    except ValueError as exc:  # rgb8: a pixel format with no meaning as a photo
        raise ExploreError(str(exc)) from None


@contextmanager
def one_thread():
    """A click is one query vector against a few thousand cells: threads gain nothing there, and on a
    busy CPU their barriers cost 100x the work (measured: 0.7 ms on one thread, 160 ms median on two
    with other processes running). Callers hold the session lock, so the process-wide setting is safe."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class Session:
    """The explorer's state for one engine.

    Args:
        engine: a ``cleandift_rt.Engine`` (anything with ``extract``, ``taps``, ``size``, ``resize``, ``info``).
        heads: ``ProjectionHeads`` for the projected recipe (None: not offered).
        timestep: the projected recipe's default t (the student's timestep).
        fusions: ``{name: fusion.Fusion}`` offered as fusion recipes.
        library: image files the page may pick from (a folder given on the command line).
        start: the recipe the page starts with (a :meth:`recipe` spec; default: the raw default tap).
        max_images, max_pixels: how many images it keeps; how large one may be (default: the package's
            image limit, ``CLEANDIFT_MAX_IMAGE_PIXELS``).
    """

    def __init__(self, engine, *, heads=None, timestep: float = 261.0, fusions=None, library=(), start=None,
                 max_images: int = MAX_IMAGES, max_pixels: int | None = None):
        self.engine, self.heads, self.timestep = engine, heads, float(timestep)
        self.fusions = dict(fusions or {})
        self.library = [Path(p) for p in library]
        self.max_images = int(max_images)
        self.max_pixels = limit("MAX_IMAGE_PIXELS") if max_pixels is None else int(max_pixels)
        self.images: dict[int, LoadedImage] = {}
        self.lock = threading.RLock()
        self._next_id = 0
        self._recipes: OrderedDict[str, object] = OrderedDict()
        self._pca: dict[str, tuple[tuple[int, ...], dict]] = {}
        taps = [t for t in engine.taps if t in TAPS]
        self.start = dict(start) if start else {"kind": "tap", "tap": DEFAULT_TAP if DEFAULT_TAP in taps else taps[0]}
        self.recipe(self.start)  # refused now, not on the page

    # -- what the page shows -----------------------------------------------------------------------

    def describe(self) -> dict:
        engine_taps = list(self.engine.taps)
        taps = [t for t in engine_taps if t in TAPS]
        heads = None
        if self.heads is not None:
            heads = {"taps": [t for t in taps if t in self.heads.taps], "t": self.timestep}
        info = self.engine.info
        with self.lock:
            images = [{"id": im.id, "name": im.name, "width": im.image.width, "height": im.image.height,
                       "url": f"/image/{im.id}", "seconds": round(im.seconds, 3)} for im in self.images.values()]
        return {"engine": {"path": Path(str(info.get("path", ""))).name, "backend": info.get("backend"),
                           "size": list(self.engine.size), "resize": self.engine.resize},
                "taps": taps, "start": self.start,
                "outputs": [t for t in engine_taps if t not in TAPS],  # "hyper" with an aggregator
                "heads": heads, "fusions": list(self.fusions), "images": images,
                "library": [p.name for p in self.library],
                "limits": {"images": self.max_images, "megapixels": self.max_pixels / 1e6}}

    def display(self, image_id) -> bytes:
        return self._image(image_id).display

    # -- images ------------------------------------------------------------------------------------

    def add_image(self, name: str, data: bytes) -> dict:
        """Decode, extract every engine output once, keep it. Returns the image's description."""
        name = Path(str(name or "image")).name[:80] or "image"
        image = decode_image(data, name, self.max_pixels)
        with self.lock:
            if len(self.images) >= self.max_images:
                raise ExploreError(f"{self.max_images} images are loaded, the most the explorer keeps: remove one first")
            prepared = prepare_images([image], self.engine.size, self.engine.resize)
            t0 = time.perf_counter()
            out = self.engine.extract(prepared.pixels, taps=list(self.engine.taps))
            seconds = time.perf_counter() - t0
            taps = {t: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)[0].float().contiguous()
                    for t, v in out.items()}
            shown = image.copy()
            shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.BICUBIC)
            buffer = io.BytesIO()
            shown.save(buffer, format="JPEG", quality=88)
            loaded = LoadedImage(self._next_id, name, image, prepared.geometry[0], taps, buffer.getvalue(), seconds)
            self.images[loaded.id] = loaded
            self._next_id += 1
            return {"id": loaded.id, "name": name, "seconds": round(seconds, 3)}

    def add_file(self, path) -> dict:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ExploreError(f"cannot read {path}: {exc.strerror or exc}") from None
        return self.add_image(path.name, data)

    def pick(self, index) -> dict:
        """Load the ``index``-th image of the library (the page names files by position, never by path)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.library):
            raise ExploreError(f"no image {index!r} in the folder list (0..{len(self.library) - 1})")
        return self.add_file(self.library[index])

    def remove(self, image_id) -> None:
        with self.lock:
            self._image(image_id)
            del self.images[image_id]
            for recipe in self._recipes.values():
                recipe.forget(image_id)

    def _image(self, image_id) -> LoadedImage:
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id not in self.images:
            raise ExploreError(f"no image {image_id!r} is loaded (it may have been removed): reload the page")
        return self.images[image_id]

    # -- recipes -----------------------------------------------------------------------------------

    def recipe(self, spec) -> object:
        """The recipe a page request names: ``{"kind": "tap", "tap": T}``, ``{"kind": "projected", "tap": T,
        "t": t}`` or ``{"kind": "fusion", "name": N}``; built once and kept (most recent ``RECIPE_CACHE``)."""
        if not isinstance(spec, dict):
            raise ExploreError("the request names no recipe")
        kind, tap = spec.get("kind"), spec.get("tap")
        if kind == "tap":
            if tap not in self.engine.taps:
                raise ExploreError(f"the engine has no output {tap!r}: it has {', '.join(self.engine.taps)}")
            made = TapRecipe(tap, self.engine.size)
        elif kind == "projected":
            if self.heads is None:
                raise ExploreError("no projection heads: start the explorer with --heads FULL_FILE (a '_full' student)")
            if tap not in self.heads.taps or tap not in self.engine.taps:
                raise ExploreError(f"no projection head for tap {tap!r} on this engine: pick one of "
                                   f"{', '.join(t for t in self.heads.taps if t in self.engine.taps)}")
            t = spec.get("t")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 999:
                raise ExploreError(f"timestep {t!r}: give a number from 0 to 999")
            made = ProjectedRecipe(tap, t, self.heads, self.engine.size)
        elif kind == "fusion":
            name = spec.get("name")
            if name not in self.fusions:
                raise ExploreError(f"no fusion recipe {name!r}" + (f": this explorer offers {', '.join(self.fusions)}"
                                   if self.fusions else ": start the explorer with --dino PATH to offer tale and tlfr"))
            made = FusionRecipe(self.fusions[name])
        else:
            raise ExploreError(f"unknown recipe kind {kind!r}: tap, projected or fusion")
        with self.lock:
            recipe = self._recipes.pop(made.key, made)
            self._recipes[made.key] = recipe  # most recently used last
            while len(self._recipes) > RECIPE_CACHE:
                self._recipes.popitem(last=False)
            return recipe

    def prepare(self, spec) -> dict:
        """Compute what clicks on ``spec`` need for every image, and the PCA picture of each image."""
        with self.lock:
            recipe = self.recipe(spec)
            images = list(self.images.values())
            t0 = time.perf_counter()
            recipe.prepare(images)
            ids = tuple(im.id for im in images)
            cached = self._pca.get(recipe.key)
            if cached is None or cached[0] != ids:
                pictures = pca_pictures(recipe.maps(images), [im.image.size for im in images]) if images else []
                self._pca[recipe.key] = (ids, {im.id: data_url(p) for im, p in zip(images, pictures)})
                for key in [k for k in self._pca if k not in self._recipes]:  # pictures of recipes let go
                    del self._pca[key]
            return {"recipe": recipe.label(), "pca": self._pca[recipe.key][1],
                    "seconds": round(time.perf_counter() - t0, 3)}

    # -- clicks ------------------------------------------------------------------------------------

    def click(self, spec, image_id, x, y) -> dict:
        """Where the point ``(x, y)`` (pixels of image ``image_id``, centres at integers) lands on every
        other image: best match, its similarity and the heat map."""
        for v in (x, y):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ExploreError(f"the click position ({x!r}, {y!r}) is not a pair of numbers")
        with self.lock:
            t0 = time.perf_counter()
            recipe = self.recipe(spec)
            source = self._image(image_id)
            width, height = source.image.size
            if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                raise ExploreError(f"the click ({x:.1f}, {y:.1f}) lies outside {source.name} ({width} x {height} "
                                   "pixels): click on the image")
            targets = [im for im in self.images.values() if im is not source]
            if not targets:
                raise ExploreError("load a second image: the click is matched on every other image")
            with one_thread():
                t1 = time.perf_counter()
                found = recipe.click(source, (float(x), float(y)), targets)
                matching = time.perf_counter() - t1
                matches = []
                for target, m in zip(targets, found):
                    picture, low, high = heat_picture(m.heat, m.grid, *target.image.size)
                    matches.append({"image": target.id, "x": m.xy[0], "y": m.xy[1], "similarity": m.similarity,
                                    "heat": data_url(picture), "low": low, "high": high})
            return {"recipe": recipe.label(), "source": {"image": source.id, "x": float(x), "y": float(y)},
                    "matches": matches, "match_ms": round(matching * 1e3, 2),
                    "total_ms": round((time.perf_counter() - t0) * 1e3, 2)}
