"""SPair-71k in its official layout (docs/method.md, evaluation protocol).

::

    SPair-71k/
      JPEGImages/{category}/{imname}.jpg
      ImageAnnotation/{category}/{imname}.json     (not needed for PCK)
      PairAnnotation/{trn,val,test}/{id}-{src}-{trg}:{category}.json
      Layout/{large,small}/{trn,val,test}.txt     (optional: the list of pairs of a split)

Each pair file holds ``src_imname``, ``trg_imname``, ``src_imsize`` / ``trg_imsize`` ([W, H, C]),
``src_kps``, ``trg_kps`` ([[x, y], ...]), ``trg_bndbox`` ([x1, y1, x2, y2]) and ``category``;
also read when present: ``kps_ids`` (which of the category's keypoints each one is; the fusion
recipes' adaptive flip needs them to swap left and right parts) and ``src_bndbox``.
"""

from __future__ import annotations

from pathlib import Path

from ..checks import read_json_file
from ..runs.skips import SkipLog
from .pairs import Pair, make_pair

SPLITS = {"test": "test", "val": "val", "trn": "trn", "train": "trn"}
REQUIRED_FIELDS = ("src_imname", "trg_imname", "src_kps", "trg_kps", "trg_bndbox", "category")


def split_dir(root: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown SPair-71k split {split!r}: use one of test, val, trn")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"SPair-71k root {root} does not exist")
    d = root / "PairAnnotation" / SPLITS[split]
    if not d.is_dir():
        raise ValueError(f"{root} does not look like SPair-71k: {d} is missing (expected PairAnnotation/{{trn,val,test}}/"
                         "*.json and JPEGImages/{category}/ from SPair-71k.tar.gz)")
    if not (root / "JPEGImages").is_dir():
        raise ValueError(f"{root} does not look like SPair-71k: JPEGImages/ is missing")
    return d


def load_spair(root: str | Path, split: str = "test", categories=None, limit: int | None = None,
               skips: SkipLog | None = None) -> tuple[list[Pair], SkipLog]:
    """All pairs of a split, sorted by category then file name (pairs of one category share images,
    which keeps the feature cache warm). ``limit`` keeps the first N pairs of each category."""
    ann_dir = split_dir(root, split)
    root = Path(root)
    skips = skips if skips is not None else SkipLog("pair")
    wanted = set(categories) if categories else None
    per_category: dict[str, int] = {}
    pairs: list[Pair] = []
    files = sorted(ann_dir.glob("*.json"), key=lambda p: (p.stem.rsplit(":", 1)[-1], p.name))
    if not files:
        raise ValueError(f"{ann_dir} holds no pair annotations (*.json)")
    for f in files:
        try:
            ann = read_json_file(f, f.name)  # depth and size bounded; errors name the file
        except ValueError as exc:
            skips.add("malformed annotation", f"invalid JSON: {exc}")
            continue
        try:
            if not isinstance(ann, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in REQUIRED_FIELDS if k not in ann]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            category = str(ann["category"])
            if wanted is not None and category not in wanted:
                continue
            if limit is not None and per_category.get(category, 0) >= limit:
                continue
            img_dir = root / "JPEGImages" / category
            pair = make_pair(ann.get("pair_id", f.stem), category, img_dir / ann["src_imname"], img_dir / ann["trg_imname"],
                             ann["src_kps"], ann["trg_kps"], ann["trg_bndbox"], ann.get("src_imsize"), ann.get("trg_imsize"),
                             ann.get("kps_ids"), ann.get("src_bndbox"))
        except ValueError as exc:
            skips.add("malformed annotation", f"{f.name}: {exc}")
            continue
        pair.pair_id = f.stem  # unique and stable across runs (the resume journal keys on it)
        per_category[category] = per_category.get(category, 0) + 1
        pairs.append(pair)
    if wanted:
        unknown = wanted - set(per_category)
        if unknown:
            raise ValueError(f"no pairs of categor{'y' if len(unknown) == 1 else 'ies'} {sorted(unknown)} in {ann_dir}")
    return pairs, skips
