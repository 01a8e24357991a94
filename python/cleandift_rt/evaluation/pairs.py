"""Keypoint pairs: the record every benchmark loader produces, PF-Pascal / PF-Willow CSVs, and ``pairs.json``.

``pairs.json``, the format for your own data (paths relative to the file, or to ``images_root``)::

    {
      "images_root": "images",                  # optional, relative to this file
      "pairs": [
        {"source": "a.jpg", "target": "b.jpg",
         "source_points": [[x, y], ...],        # pixels of the original image, x right, y down
         "target_points": [[x, y], ...],        # same length and order as source_points
         "target_bbox": [x1, y1, x2, y2],       # optional; PCK@bbox uses the keypoints' extent without it
         "category": "mug",                     # optional, for per-category PCK
         "id": "mug-001"}                       # optional, default "<index>"
      ]
    }

A bare list of pair objects is accepted too. Loaders never raise on one bad pair: they skip it,
log why in a :class:`runs.skips.SkipLog`, and go on; only an unreadable file as a whole is an error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import read_json_file
from ..runs.skips import SkipLog

PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")


@dataclass
class Pair:
    """A source/target image pair with corresponding keypoints (x, y in original-image pixels)."""

    pair_id: str
    category: str
    source: Path
    target: Path
    source_points: np.ndarray  # [N, 2] float64
    target_points: np.ndarray  # [N, 2] float64
    target_bbox: tuple[float, float, float, float] | None = None
    source_size: tuple[int, int] | None = None  # (W, H) from the annotation, checked against the image
    target_size: tuple[int, int] | None = None
    keypoint_ids: tuple[int, ...] | None = None  # SPair-71k's kps_ids: which part each keypoint is
    source_bbox: tuple[float, float, float, float] | None = None


def points_array(value, what: str) -> np.ndarray:
    """``[[x, y], ...]`` -> float64 ``[N, 2]``, with a message naming ``what`` when it is not that."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of [x, y] numbers") from None
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{what} must be a list of [x, y] pairs, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return arr


def check_bbox(value, what: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be [x1, y1, x2, y2] numbers") from None
    if len(box) != 4 or box[2] < box[0] or box[3] < box[1] or not np.isfinite(box).all():
        raise ValueError(f"{what} must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {list(value)}")
    return box  # type: ignore[return-value]


def make_pair(pair_id, category, source, target, source_points, target_points, target_bbox=None,
              source_size=None, target_size=None, keypoint_ids=None, source_bbox=None) -> Pair:
    """Validate one pair's fields (raises ValueError naming the problem)."""
    src = points_array(source_points, "source keypoints")
    trg = points_array(target_points, "target keypoints")
    if len(src) != len(trg):
        raise ValueError(f"{len(src)} source keypoints but {len(trg)} target keypoints: they must correspond 1:1")
    box = None if target_bbox is None else check_bbox(target_bbox, "target bounding box")
    if box is not None and max(box[2] - box[0], box[3] - box[1]) <= 0:
        raise ValueError(f"target bounding box {list(box)} has zero size: PCK@bbox would judge every keypoint against "
                         "a threshold of 0 (fix the annotation or drop the pair)")
    src_box = None if source_bbox is None else check_bbox(source_bbox, "source bounding box")
    source, target = image_path(source, "source image"), image_path(target, "target image")
    return Pair(str(pair_id), str(category), source, target, src, trg, box,
                _size(source_size, "source image size"), _size(target_size, "target image size"),
                _keypoint_ids(keypoint_ids, len(src)), src_box)


def image_path(name, what: str) -> Path:
    """An annotation's image name as a path the file system can look up: ``os.stat`` raises
    OSError, not "missing", on a NUL byte, a name component over 255 bytes or a path over 4095."""
    if not isinstance(name, (str, Path)):
        raise ValueError(f"{what} must be a file name, got {type(name).__name__}")
    path = Path(name)
    if "\x00" in str(path):
        raise ValueError(f"{what} name {str(path)[:60]!r} contains a NUL byte")
    too_long = [part for part in path.parts if len(part.encode("utf-8", "surrogateescape")) > 255]
    if too_long:
        raise ValueError(f"{what} name has a component of {len(too_long[0].encode('utf-8', 'surrogateescape'))} bytes "
                         f"({too_long[0][:40]!r}...); file systems allow 255")
    if len(str(path).encode("utf-8", "surrogateescape")) > 4095:
        raise ValueError(f"{what} name is {len(str(path))} characters long; paths are limited to 4095 bytes")
    return path


def _keypoint_ids(value, count: int) -> tuple[int, ...] | None:
    """SPair-71k's ``kps_ids`` (numbers or numeric strings, one per keypoint, distinct) as ints."""
    if value is None:
        return None
    try:
        ids = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"keypoint ids must be whole numbers, got {value!r}") from None
    if len(ids) != count:
        raise ValueError(f"{len(ids)} keypoint ids for {count} keypoints: kps_ids must name every keypoint")
    if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
        raise ValueError(f"keypoint ids must be distinct and >= 0, got {list(ids)}")
    return ids


def _size(value, what: str):
    if value is None:
        return None
    try:
        w, h = int(value[0]), int(value[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{what} must be [W, H, ...], got {value!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return (w, h)


def load_pairs_json(path: str | Path, images_root: str | Path | None = None, skips: SkipLog | None = None) -> tuple[list[Pair], SkipLog]:
    """Read a ``pairs.json`` file (format in this module's docstring)."""
    path = Path(path)
    skips = skips if skips is not None else SkipLog("pair")
    doc = read_json_file(path, f"pairs file {path}")  # depth and size bounded; errors name the file
    if isinstance(doc, dict):
        entries = doc.get("pairs")
        root = Path(images_root) if images_root else path.parent / doc.get("images_root", ".")
    else:
        entries, root = doc, Path(images_root) if images_root else path.parent
    if not isinstance(entries, list):
        raise ValueError(f"{path} must hold a list of pairs or {{\"pairs\": [...]}}; see docs/evaluation.md")
    pairs = []
    for i, e in enumerate(entries):
        where = f"{path.name}[{i}]"
        try:
            if not isinstance(e, dict):
                raise ValueError("each pair must be an object")
            missing = [k for k in ("source", "target", "source_points", "target_points") if k not in e]
            if missing:
                raise ValueError(f"missing field(s) {missing}")
            pairs.append(make_pair(e.get("id", str(i)), e.get("category", "all"), root / e["source"], root / e["target"],
                                   e["source_points"], e["target_points"], e.get("target_bbox")))
        except ValueError as exc:
            skips.add("malformed pair", f"{where}: {exc}")
    return pairs, skips


def load_pf_csv(path: str | Path, images_root: str | Path | None = None, skips: SkipLog | None = None) -> tuple[list[Pair], SkipLog]:
    """PF-Pascal (``source_image,target_image,class,XA,YA,XB,YB[,...]``, ``;``-separated coordinates)
    or PF-Willow (``imageA,imageB`` + 10 source x, 10 source y, 10 target x, 10 target y) pair CSVs.

    Image paths are resolved against ``images_root``, else the CSV's folder, else its parent (the
    published CSVs name images like ``PF-dataset-PASCAL/JPEGImages/x.jpg``). Neither dataset has
    object boxes in these files: PCK@bbox uses the extent of the target keypoints, as ProposalFlow does.
    """
    path = Path(path)
    skips = skips if skips is not None else SkipLog("pair")
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path} has no pairs (expected a header row and one row per pair)")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    is_pascal = len(header) >= 7 and header[2].lower() in ("class", "category")
    if not is_pascal and len(header) != 42:
        raise ValueError(f"{path}: unrecognised CSV layout ({len(header)} columns). Expected PF-Pascal "
                         "(source_image,target_image,class,XA,YA,XB,YB) or PF-Willow (imageA,imageB + 40 coordinates)")
    roots = [Path(images_root)] if images_root else [path.parent, path.parent.parent]
    pairs = []
    for i, row in enumerate(body):
        where = f"{path.name} row {i + 2}"
        try:
            if is_pascal:
                src_name, trg_name, cls = row[0], row[1], row[2]
                category = PASCAL_CLASSES[int(cls) - 1] if cls.strip().isdigit() and 1 <= int(cls) <= 20 else cls
                xa, ya, xb, yb = (np.array([float(v) for v in c.split(";") if v.strip()]) for c in row[3:7])
                if not (len(xa) == len(ya) and len(xb) == len(yb)):
                    raise ValueError("x and y lists differ in length")
                src_pts, trg_pts = np.stack([xa, ya], 1), np.stack([xb, yb], 1)
            else:
                src_name, trg_name = row[0], row[1]
                v = np.array([float(x) for x in row[2:42]])
                src_pts, trg_pts = v[:20].reshape(2, 10).T, v[20:].reshape(2, 10).T
                parts = Path(src_name).parts
                category = parts[-2] if len(parts) >= 2 else "all"
            trg_box = (*trg_pts.min(0), *trg_pts.max(0)) if len(trg_pts) else None
            pairs.append(make_pair(f"{i:05d}", category, _resolve(src_name, roots), _resolve(trg_name, roots),
                                   src_pts, trg_pts, trg_box))
        except (ValueError, IndexError) as exc:
            skips.add("malformed CSV row", f"{where}: {exc}")
    return pairs, skips


def _resolve(name: str, roots: list[Path]) -> Path:
    image_path(name, "image")
    for r in roots:
        if (r / name).exists():
            return r / name
    return roots[0] / name  # reported as missing when the run opens it


def load_pairs(path: str | Path, images_root: str | Path | None = None) -> tuple[list[Pair], SkipLog]:
    """``pairs.json`` or a PF-Pascal / PF-Willow CSV, chosen by the file extension."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_pf_csv(path, images_root)
    if path.suffix.lower() == ".json":
        return load_pairs_json(path, images_root)
    raise ValueError(f"{path}: pairs must be a .json file (see docs/evaluation.md) or a PF-Pascal/PF-Willow .csv")
