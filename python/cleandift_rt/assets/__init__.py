"""Bundled photos (CC0 / public domain, see SOURCES.md) for the demo, tests and smoke checks."""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent
PHOTOS = ("cat", "coffee", "astronaut")


def photo_path(name: str) -> Path:
    if name not in PHOTOS:
        raise ValueError(f"no bundled photo {name!r}: choose one of {', '.join(PHOTOS)}")
    return ASSET_DIR / f"{name}.jpg"


def load_photo(name: str):
    from PIL import Image

    with Image.open(photo_path(name)) as im:
        return im.convert("RGB")
