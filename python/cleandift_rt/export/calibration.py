"""The images a quantization is calibrated on and the held-out images it is validated on.

From a folder (``--calibration DIR``, searched recursively): the files are put in a fixed order that
does not follow their names (by a hash of each relative path, so a folder sorted by category does
not hold out one category), the first ``validation_size`` are held out for the accuracy metric and
the next ``calibration_size`` give the quantization statistics; the two never overlap. Without a
folder, the bundled photos serve as both, with a warning: statistics from three photos of another
domain, and an accuracy measured on the very images calibrated on, say little about the user's
images. Images are decoded upright and sized as the Engine sizes them (the file's size and resize
policy). ``record()`` is what the int8 file keeps: size, source and a SHA-256 of the calibration
files' names and bytes.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MIN_VALIDATION = 2  # match agreement pairs held-out images
BUNDLED_WARNING = ("calibrating int8 on the 3 bundled photos, and measuring its accuracy on the same photos: real "
                   "calibration needs images of your domain (--calibration DIR, tens to hundreds of images)")


@dataclass
class CalibrationSet:
    calibration: np.ndarray  # N x 3 x H x W float32 in [-1, 1]
    validation: np.ndarray  # V x 3 x H x W, held out from the calibration set (bundled photos: the same)
    source: str  # the folder, or "bundled photos"
    validation_source: str  # how the validation images relate to the calibration set
    sha256: str  # of the calibration files' relative names and bytes, in order
    skipped: tuple = ()  # (path, why) of files that could not be decoded

    @classmethod
    def from_options(cls, folder, calibration_size: int, validation_size: int, size: tuple[int, int], resize: str,
                     log=print) -> "CalibrationSet":
        if folder is None:
            return cls.bundled(size, resize)
        return cls.from_folder(Path(folder), calibration_size, validation_size, size, resize, log)

    @classmethod
    def bundled(cls, size, resize) -> "CalibrationSet":
        from ..assets import PHOTOS, photo_path

        warnings.warn(BUNDLED_WARNING, UserWarning, stacklevel=3)
        paths = [photo_path(p) for p in PHOTOS]
        pixels, _ = _decode(paths, size, resize)
        return cls(pixels, pixels, "bundled photos", "the bundled photos, also the calibration set",
                   _digest([(p.name, p) for p in paths]))

    @classmethod
    def from_folder(cls, folder: Path, calibration_size: int, validation_size: int, size, resize,
                    log=print) -> "CalibrationSet":
        files = image_files(folder)
        files.sort(key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
        held_out = min(validation_size, max(MIN_VALIDATION, len(files) // 4))
        validation, rest = files[:held_out], files[held_out:held_out + calibration_size]
        if len(rest) < calibration_size:
            log(f"--calibration {folder}: {len(rest)} images for calibration after holding out {held_out} "
                f"(--calibration-size {calibration_size} asked for more)")
        val_pixels, bad_val = _decode([f for _, f in validation], size, resize)
        cal_pixels, bad_cal = _decode([f for _, f in rest], size, resize)
        skipped = tuple(bad_val + bad_cal)
        for path, why in skipped:
            log(f"skipped {path}: {why}")
        if len(val_pixels) < MIN_VALIDATION or len(cal_pixels) < 1:
            raise ValueError(f"--calibration {folder}: too few readable images ({len(val_pixels)} held out, "
                             f"{len(cal_pixels)} for calibration)")
        kept = [(name, f) for name, f in rest if str(f) not in {p for p, _ in bad_cal}]
        return cls(cal_pixels, val_pixels, str(folder), f"{len(val_pixels)} images of {folder} held out from "
                   "calibration", _digest(kept), skipped)

    def record(self) -> dict:
        """What the int8 file keeps about its calibration."""
        return {"images": int(len(self.calibration)), "source": self.source, "sha256": self.sha256,
                "size": list(self.calibration.shape[2:])}


def image_files(folder) -> list[tuple[str, Path]]:
    """(relative name, path) of the images in ``folder`` (recursively), by name; a ValueError when it
    is not a folder or holds too few images to hold some out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calibration {folder} is not a folder of images")
    files = sorted((f.relative_to(folder).as_posix(), f) for f in folder.rglob("*")
                   if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if len(files) < MIN_VALIDATION + 1:
        raise ValueError(f"--calibration {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}): int8 "
                         f"needs at least {MIN_VALIDATION + 1} ({MIN_VALIDATION} held out for the accuracy check; "
                         "tens to hundreds give better statistics)")
    return files


def _decode(paths, size, resize) -> tuple[np.ndarray, list]:
    """Pixels of the readable images (as the Engine prepares them) and (path, why) of the others."""
    from ..features.preprocess import load_image, prepare_images

    pixels, bad = [], []
    for path in paths:
        try:
            pixels.append(prepare_images([np.asarray(load_image(path))], size, resize).pixels[0].numpy())
        except (ValueError, TypeError, OSError) as exc:
            bad.append((str(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    shape = (0, 3, *size)
    return (np.stack(pixels).astype(np.float32) if pixels else np.zeros(shape, np.float32)), bad


def _digest(named_files) -> str:
    digest = hashlib.sha256()
    for name, path in named_files:
        digest.update(name.encode() + b"\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


__all__ = ["CalibrationSet", "BUNDLED_WARNING", "image_files"]
