"""Captioned image folders for training: ``name.jpg|png|webp`` beside ``name.json`` (``"caption"``) or ``name.txt``.

Images are decoded with Pillow, converted to RGB and resized by ``preprocess.prepare_images`` with
the inference resize policy, so training sees exactly the pixels inference sees. Unreadable and
too-small images are skipped and counted (``runs.skips.SkipLog``), never fatal. The order is a seeded permutation per epoch
and the sampler's position is part of a checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import read_json_file
from ..features.preprocess import load_image, prepare_images
from ..runs.skips import SkipLog

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SHOWN = 5


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str


def read_caption(image: Path) -> str | None:
    """The caption of ``image`` from ``name.json`` (``"caption"``) or ``name.txt``; ``None`` when neither exists."""
    as_json, as_txt = image.with_suffix(".json"), image.with_suffix(".txt")
    if as_json.is_file():
        meta = read_json_file(as_json, f"caption file {as_json}")
        if not isinstance(meta, dict) or not isinstance(meta.get("caption"), str):
            raise ValueError(f"caption file {as_json} has no string field \"caption\" "
                             "(expected {\"caption\": \"a photo of ...\"})")
        return meta["caption"]
    if as_txt.is_file():
        try:
            return as_txt.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise ValueError(f"caption file {as_txt} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it "
                             "as UTF-8") from None
    return None


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def decode(path: Path):
    """Fully decode one image as RGB, upright (truncated files fail here, not at the header)."""
    return load_image(path)


class ImageFolder:
    """The usable images of one folder (sorted by name), with their captions."""

    def __init__(self, root: str | Path, captions: bool = True, min_side: int = 64):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data folder {self.root} does not exist or is not a folder")
        files = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"data folder {self.root} holds no images ({'/'.join(IMAGE_SUFFIXES)}): "
                             "put name.jpg + name.json ({\"caption\": ...}) or name.txt pairs there")
        if captions:
            missing = [p.name for p in files if read_caption(p) is None]
            if missing:
                shown = ", ".join(missing[:_SHOWN]) + (f" ... ({len(missing)} in all)" if len(missing) > _SHOWN else "")
                raise ValueError(f"{len(missing)} of {len(files)} images in {self.root} have no caption ({shown}): "
                                 "add name.json with a \"caption\" field or name.txt beside each image, "
                                 "or train prompt-free with --no-captions")
        self.skipped = SkipLog("image")
        self.samples: list[Sample] = []
        for path in files:
            try:
                w, h = _header_size(path)
            except Exception as exc:  # Pillow raises many types for corrupt files
                self.skipped.add("unreadable", f"{path.name} ({type(exc).__name__})")
                continue
            if min(w, h) < min_side:
                self.skipped.add("too small", f"{path.name} ({w}x{h} < {min_side} px)")
                continue
            self.samples.append(Sample(path, (read_caption(path) or "") if captions else ""))
        if not self.samples:
            raise ValueError(f"no usable images in {self.root}: {self.skipped.summary()}")

    def __len__(self) -> int:
        return len(self.samples)

    def split(self, count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
        """(training, held-out) with ``count`` held-out samples chosen by a seeded permutation."""
        order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:count])
        return ([s for i, s in enumerate(self.samples) if i not in held],
                [s for i, s in enumerate(self.samples) if i in held])


def load_pixels(samples: list[Sample], size: int, policy: str, skipped: SkipLog) -> tuple[torch.Tensor | None, list[str]]:
    """Decode and prepare ``samples``; those that fail to decode are counted in ``skipped`` and left out."""
    images, captions = [], []
    for s in samples:
        try:
            images.append(decode(s.path))
        except Exception as exc:
            skipped.add("unreadable", f"{s.path.name} ({type(exc).__name__})")
            continue
        captions.append(s.caption)
    if not images:
        return None, []
    return prepare_images(images, size, policy).pixels, captions


class BatchSampler:
    """Seeded per-epoch permutations; ``state()`` / ``load_state()`` give exact resumption."""

    def __init__(self, samples: list[Sample], seed: int, size: int, policy: str, skipped: SkipLog):
        if not samples:
            raise ValueError("no training images left after holding out validation images")
        self.samples = list(samples)
        self.seed, self.size, self.policy, self.skipped = seed, size, policy, skipped
        self.epoch, self.position = 0, 0
        self._broken: set[int] = set()  # indices that failed to decode: skipped in later epochs without recount
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.samples), generator=gen).tolist()

    def _next_index(self) -> int:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """``batch_size`` images (B x 3 x H x W in [-1, 1]) and their captions; undecodable images replaced."""
        pixels, captions = [], []
        while len(captions) < batch_size:
            if len(self._broken) >= len(self.samples):
                raise ValueError(f"none of the {len(self.samples)} training images can be decoded: {self.skipped.summary()}")
            index = self._next_index()
            if index in self._broken:
                continue
            got, caps = load_pixels([self.samples[index]], self.size, self.policy, self.skipped)
            if got is None:
                self._broken.add(index)
                continue
            pixels.append(got)
            captions.extend(caps)
        return torch.cat(pixels), captions

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "broken": sorted(self._broken)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._broken = set(state.get("broken", []))
        self._order = self._permutation(self.epoch)
