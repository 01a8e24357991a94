"""Test helper: a small SPair-71k tree of bundled photos and warped copies with exactly known point
maps (plus broken entries), shared by the evaluation and CLI tests through the `spair` fixture in
conftest.py."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image



def _affine_warp(img: Image.Image, m: np.ndarray, t: np.ndarray, size) -> Image.Image:
    """Target = source under p' = m p + t (PIL wants the inverse map, output -> input)."""
    inv = np.linalg.inv(m)
    c = -inv @ t
    return img.transform(size, Image.AFFINE, data=(inv[0, 0], inv[0, 1], c[0], inv[1, 0], inv[1, 1], c[1]),
                         resample=Image.BICUBIC)


def _warps(photos):
    """name -> (category, image, map from the category's canonical photo to this image's pixels)."""
    cat = photos["cat"]
    coffee = photos["coffee"].resize((300, 200), Image.BICUBIC)
    w, h = cat.size
    s = 0.8
    small = cat.resize((round(w * s), round(h * s)), Image.BICUBIC)
    ang = math.radians(12)
    rot_m = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) * 0.9
    rot_t = np.array([40.0, -10.0])
    rot = _affine_warp(coffee, rot_m, rot_t, coffee.size)
    ident = lambda p: p  # noqa: E731
    return {
        "cat_src.jpg": ("cat", cat, ident),
        "cat_flip.jpg": ("cat", cat.transpose(Image.FLIP_LEFT_RIGHT), lambda p: np.stack([w - 1 - p[:, 0], p[:, 1]], 1)),
        "cat_small.jpg": ("cat", small, lambda p: (p + 0.5) * s - 0.5),
        "coffee_src.jpg": ("coffee", coffee, ident),
        "coffee_rot.jpg": ("coffee", rot, lambda p: p @ rot_m.T + rot_t),
    }


def _canonical_points(size, n=(4, 3)) -> np.ndarray:
    w, h = size
    xs = np.linspace(0.3 * w, 0.7 * w, n[0]).round()
    ys = np.linspace(0.3 * h, 0.7 * h, n[1]).round()
    return np.array([[x, y] for y in ys for x in xs])


GOOD_PAIRS = [("cat_src.jpg", "cat_flip.jpg"), ("cat_src.jpg", "cat_small.jpg"), ("cat_flip.jpg", "cat_small.jpg"),
              ("coffee_src.jpg", "coffee_rot.jpg"), ("coffee_rot.jpg", "coffee_src.jpg")]
# The trn split holds the good pairs, val the cat pairs the other way round (PairAnnotation/{trn,val}).
VAL_PAIRS = [("cat_flip.jpg", "cat_src.jpg"), ("cat_small.jpg", "cat_src.jpg"), ("cat_small.jpg", "cat_flip.jpg")]


# SPair-71k kps_ids of the 4 x 3 canonical grid (row by row): for the cat, the two columns that mirror
# each other in a row are a left/right pair of SPair's cat keypoints, (0, 1), (2, 3), ...
KPS_IDS = {"cat": [0, 2, 3, 1, 4, 6, 7, 5, 9, 11, 12, 10], "coffee": list(range(12))}


def _pair_json(pid, category, src, trg, src_kps, trg_kps, src_size, trg_size, kps_ids=None):
    box = [float(trg_kps[:, 0].min() - 10), float(trg_kps[:, 1].min() - 10),
           float(trg_kps[:, 0].max() + 10), float(trg_kps[:, 1].max() + 10)]
    ann = {"pair_id": pid, "category": category, "src_imname": src, "trg_imname": trg,
           "src_imsize": [src_size[0], src_size[1], 3], "trg_imsize": [trg_size[0], trg_size[1], 3],
           "src_kps": np.round(src_kps, 3).tolist(), "trg_kps": np.round(trg_kps, 3).tolist(), "trg_bndbox": box,
           "src_bndbox": [0, 0, src_size[0] - 1, src_size[1] - 1]}
    if kps_ids is not None:
        ann["kps_ids"] = [str(i) for i in kps_ids]  # SPair-71k writes them as strings
    return ann


def write_spair_tree(root: Path, photos) -> dict:
    """An SPair-format tree under `root`, plus the ground truth the tests know independently."""
    warps = _warps(photos)
    canon = {cat: _canonical_points(img.size) for cat, img, _ in (warps["cat_src.jpg"], warps["coffee_src.jpg"])}
    decoded = {}  # what the runner will see, to recognise each image by its pixels
    for name, (cat, img, _) in warps.items():
        (root / "JPEGImages" / cat).mkdir(parents=True, exist_ok=True)
        img.save(root / "JPEGImages" / cat / name, quality=95)
        decoded[pixels_key(Image.open(root / "JPEGImages" / cat / name).convert("RGB"))] = name
    (root / "JPEGImages" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ann = root / "PairAnnotation" / "test"
    ann.mkdir(parents=True)
    truth = {}
    for i, (src, trg) in enumerate(GOOD_PAIRS):
        cat, s_img, s_map = warps[src]
        _, t_img, t_map = warps[trg]
        sk, tk = s_map(canon[cat]), t_map(canon[cat])
        pid = f"{i:06d}-{src[:-4]}-{trg[:-4]}:{cat}"
        (ann / f"{pid}.json").write_text(json.dumps(_pair_json(pid, cat, src, trg, sk, tk, s_img.size, t_img.size,
                                                               KPS_IDS[cat])))
        truth[pid] = (sk, tk)
    for split, pairs in (("trn", GOOD_PAIRS), ("val", VAL_PAIRS)):
        (root / "PairAnnotation" / split).mkdir()
        for i, (src, trg) in enumerate(pairs):
            cat, s_img, s_map = warps[src]
            _, t_img, t_map = warps[trg]
            pid = f"{i:06d}-{src[:-4]}-{trg[:-4]}:{cat}"
            (root / "PairAnnotation" / split / f"{pid}.json").write_text(json.dumps(_pair_json(
                pid, cat, src, trg, s_map(canon[cat]), t_map(canon[cat]), s_img.size, t_img.size, KPS_IDS[cat])))
    cat_size = warps["cat_src.jpg"][1].size
    kps = canon["cat"]
    bad = {
        "000100-kp_outside:cat": _pair_json("x", "cat", "cat_src.jpg", "cat_src.jpg",
                                            np.vstack([kps, [[cat_size[0] + 10, 5]]]),
                                            np.vstack([kps, [[5, 5]]]), cat_size, cat_size),
        "000101-broken:cat": _pair_json("x", "cat", "cat_src.jpg", "broken.jpg", kps, kps, cat_size, cat_size),
        "000102-missing:cat": _pair_json("x", "cat", "cat_src.jpg", "nowhere.jpg", kps, kps, cat_size, cat_size),
        "000103-size:cat": _pair_json("x", "cat", "cat_src.jpg", "cat_small.jpg", kps, kps, cat_size, cat_size),
    }
    for pid, d in bad.items():
        (ann / f"{pid}.json").write_text(json.dumps(d))
    (ann / "000200-truncated:cat.json").write_text('{"src_imname": "cat_src.jpg", "trg_')
    (ann / "000201-fields:cat.json").write_text(json.dumps({"src_imname": "cat_src.jpg", "category": "cat"}))
    (ann / "000202-count:cat.json").write_text(json.dumps(
        _pair_json("x", "cat", "cat_src.jpg", "cat_flip.jpg", kps, kps[:-1], cat_size, cat_size)))
    return {"root": root, "truth": truth, "warps": warps, "decoded": decoded}


def pixels_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()
