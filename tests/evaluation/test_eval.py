"""Evaluation: PCK conventions, upsampling + matching, the SPair-71k / PF / pairs.json loaders, the runner
(cache, resume, skips) and the report. Fixtures are real bundled photos warped with known transforms,
written in the official SPair-71k layout, so the ground truth is exact."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cleandift_rt.evaluation import (EngineFeatures, PairResult, alpha_key, correct, evaluate, format_table,
                                     load_pairs, load_spair, results_document, summarize, transfer_points,
                                     write_results)
from cleandift_rt.evaluation.transfer import sample_points, upsample_columns, upsample_rows
from spair_tree import pixels_key

# ---------------------------------------------------------------------------------------------
# PCK arithmetic


def test_threshold_conventions_differ_exactly_at_the_boundary():
    d = np.array([0.0, 5.0, 10.0, np.nextafter(10.0, 11.0)])
    assert correct(d, 10.0, inclusive=True).tolist() == [True, True, True, False]  # DIFT: <=
    assert correct(d, 10.0, inclusive=False).tolist() == [True, True, False, False]  # TLFR: <


def test_per_point_and_per_image_averages():
    a = PairResult("a", "cat", np.array([1.0]), bbox_size=100.0, img_size=400.0)
    b = PairResult("b", "dog", np.array([1.0, 50.0, 10.0]), bbox_size=100.0, img_size=400.0)
    c = PairResult("c", "dog", np.array([0.0, 0.0]), bbox_size=None, img_size=50.0)  # no box: only img
    s = summarize([a, b, c], alphas=(0.1,), inclusive=True)
    cell = s["pck"]["bbox"]["0.1"]
    assert cell["point"] == pytest.approx(100 * 3 / 4)  # 1 + (1 and 10) of 4 pooled keypoints; c has no box
    assert cell["image"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    s_strict = summarize([a, b, c], alphas=(0.1,), inclusive=False)
    assert s_strict["pck"]["bbox"]["0.1"]["point"] == pytest.approx(100 * 2 / 4)  # 10 < 10 is false
    img = s["pck"]["img"]["0.1"]  # thresholds 40, 40, 5
    assert img["point"] == pytest.approx(100 * 5 / 6)
    assert img["image"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert s["per_category"]["dog"]["pairs"] == 2 and s["per_category"]["dog"]["keypoints"] == 5
    assert s["category_mean"]["img"]["0.1"]["point"] == pytest.approx((100 + 100 * 4 / 5) / 2)
    assert s["counts"] == {"pairs": 3, "keypoints": 6}
    assert s["comparison"] == "<=" and s_strict["comparison"] == "<"
    assert [alpha_key(a) for a in (0.05, 0.1, 0.15)] == ["0.05", "0.1", "0.15"]


# ---------------------------------------------------------------------------------------------
# Upsampling and transfer


def test_banded_upsampling_equals_interpolate():
    feats = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(0))
    full = F.interpolate(feats[None], size=(23, 31), mode="bilinear", align_corners=False)[0]
    rows = torch.arange(4, 17)
    band = upsample_rows(upsample_columns(feats, 31), 23, rows)
    assert torch.allclose(band.permute(2, 0, 1), full[:, 4:17], atol=1e-6)
    pts = np.array([[0, 0], [30, 22], [12.4, 7.6], [5, 20]])
    got = sample_points(feats, (23, 31), pts)
    want = torch.stack([full[:, 0, 0], full[:, 22, 30], full[:, 8, 12], full[:, 20, 5]])
    assert torch.allclose(got, want, atol=1e-6)


def _brute_force_transfer(src, trg, src_size, trg_size, pts):
    (sw, sh), (tw, th) = src_size, trg_size
    s = F.interpolate(src[None].float(), size=(sh, sw), mode="bilinear", align_corners=False)[0]
    t = F.interpolate(trg[None].float(), size=(th, tw), mode="bilinear", align_corners=False)[0]
    p = np.floor(pts + 0.5).astype(int)
    q = F.normalize(s[:, p[:, 1], p[:, 0]].T, dim=1)
    # Bilinear upsampling repeats the border vectors: score each distinct target vector once and
    # broadcast, so repeated vectors tie exactly (a matmul may round them differently) and
    # argmax's first-index rule decides, as in the kernel.
    distinct, of = torch.unique(t.flatten(1).T, dim=0, return_inverse=True)
    sim = (q @ F.normalize(distinct, dim=1).T)[:, of]
    idx = sim.argmax(1)
    return np.stack([(idx % tw).numpy(), (idx // tw).numpy()], 1).astype(float)


def test_transfer_points_equals_brute_force_over_many_bands_and_in_closed_form():
    g = torch.Generator().manual_seed(3)
    src, trg = torch.randn(16, 6, 9, generator=g), torch.randn(16, 7, 5, generator=g)
    pts = np.array([[0, 0], [70, 40], [33.2, 20.7], [143, 95]])
    want = _brute_force_transfer(src, trg, (144, 96), (80, 112), pts)
    got, sim = transfer_points(src, trg, (144, 96), (80, 112), pts, band_bytes=16 * 80 * 4 * 7)  # 7-row bands
    assert np.array_equal(got, want)
    assert sim.shape == (4,) and np.all(np.abs(sim) <= 1 + 1e-5)
    closed, closed_sim = transfer_points(src, trg, (144, 96), (80, 112), pts, method="analytic")
    assert np.array_equal(closed, want) and np.allclose(closed_sim, sim, atol=1e-5)


def test_closed_form_cosines_equal_the_upsampled_map():
    from cleandift_rt.evaluation.transfer import _cosine_analytic

    g = torch.Generator().manual_seed(5)
    feats = torch.randn(32, 6, 5, generator=g, dtype=torch.float64)
    feats[:, 2, 3] = 0  # a zero vector: cosine 0, as F.normalize gives
    q = torch.randn(3, 32, generator=g, dtype=torch.float64)
    for out_hw in ((6, 5), (37, 41), (11, 64)):
        up = F.interpolate(feats[None], size=out_hw, mode="bilinear", align_corners=False)[0]
        want = F.normalize(q, dim=1) @ F.normalize(up.flatten(1), dim=0)
        assert torch.allclose(_cosine_analytic(q, feats, out_hw), want, atol=1e-6)
    with pytest.raises(ValueError, match="unknown transfer method"):
        transfer_points(feats, feats, (5, 6), (5, 6), np.zeros((1, 2)), method="fast")


# ---------------------------------------------------------------------------------------------
# Loaders


def test_spair_loader_reads_the_official_layout_and_counts_malformed_files(spair):
    pairs, skips = load_spair(spair["root"], "test")
    ids = [p.pair_id for p in pairs]
    assert set(spair["truth"]) <= set(ids) and len(pairs) == len(spair["truth"]) + 4
    assert [p.category for p in pairs] == sorted(p.category for p in pairs)
    assert skips.pairs["malformed annotation"] == 3  # invalid JSON, missing fields, keypoint counts differ
    for what in ("invalid JSON", "missing field(s) trg_imname", "correspond 1:1"):
        assert any(what in w for w in skips.examples["malformed annotation"]), what
    p = next(p for p in pairs if p.pair_id.startswith("000003"))
    assert p.category == "coffee" and p.target.name == "coffee_rot.jpg" and p.target_size == (300, 200)
    assert np.allclose(p.target_points, spair["truth"][p.pair_id][1], atol=1e-3)
    limited, _ = load_spair(spair["root"], "test", categories=["coffee"], limit=1)
    assert [q.category for q in limited] == ["coffee"]


def test_spair_loader_reads_keypoint_ids_and_the_source_box(spair, tmp_path):
    from spair_tree import KPS_IDS

    pairs, _ = load_spair(spair["root"], "test")
    by_id = {p.pair_id: p for p in pairs}
    for pid in spair["truth"]:
        category = pid.rsplit(":", 1)[1]
        assert by_id[pid].keypoint_ids == tuple(KPS_IDS[category])  # SPair's strings read as ints, in order
        assert by_id[pid].source_bbox is not None
    assert by_id["000100-kp_outside:cat"].keypoint_ids is None  # older annotations without kps_ids still load
    ann = json.loads(next((spair["root"] / "PairAnnotation" / "test").glob("000000-*.json")).read_text())
    bad = tmp_path / "SPair"
    (bad / "JPEGImages" / "cat").mkdir(parents=True)
    (bad / "PairAnnotation" / "test").mkdir(parents=True)
    for name, ids in (("short", ann["kps_ids"][:-1]), ("words", ["left ear"] * 12), ("twice", ["1"] * 12)):
        (bad / "PairAnnotation" / "test" / f"{name}:cat.json").write_text(json.dumps({**ann, "kps_ids": ids}))
    pairs, skips = load_spair(bad)
    assert not pairs and skips.pairs["malformed annotation"] == 3
    for what in ("kps_ids must name every keypoint", "whole numbers", "distinct"):
        assert any(what in w for w in skips.examples["malformed annotation"]), what


def test_spair_loader_errors_name_the_problem(tmp_path, spair):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spair(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not look like SPair-71k"):
        load_spair(tmp_path)
    with pytest.raises(ValueError, match="unknown SPair-71k split"):
        load_spair(spair["root"], "testing")
    with pytest.raises(ValueError, match="no pairs of category"):
        load_spair(spair["root"], categories=["zebra"])


def test_pairs_json_and_pf_csv_loaders(tmp_path):
    (tmp_path / "imgs").mkdir()
    doc = {"images_root": "imgs", "pairs": [
        {"source": "a.jpg", "target": "b.jpg", "source_points": [[1, 2], [3, 4]], "target_points": [[5, 6], [7, 8]],
         "category": "mug", "id": "m1"},
        {"source": "a.jpg", "target": "b.jpg", "source_points": [[1, 2]], "target_points": [[5, 6], [7, 8]]},
        {"source": "a.jpg", "source_points": [], "target_points": []},
        {"source": "a.jpg", "target": "b.jpg", "source_points": [[1, 2]], "target_points": [[5, 6]],
         "target_bbox": [10, 10, 5, 5]}]}
    (tmp_path / "pairs.json").write_text(json.dumps(doc))
    pairs, skips = load_pairs(tmp_path / "pairs.json")
    assert [p.pair_id for p in pairs] == ["m1"] and pairs[0].source == tmp_path / "imgs" / "a.jpg"
    assert skips.pairs["malformed pair"] == 3
    assert any("correspond 1:1" in w for w in skips.examples["malformed pair"])
    assert any("missing field" in w for w in skips.examples["malformed pair"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pairs(tmp_path / "bad.json")

    with open(tmp_path / "pascal.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_image", "target_image", "class", "XA", "YA", "XB", "YB"])
        w.writerow(["PF/a.jpg", "PF/b.jpg", "8", "10;20;30", "11;21;31", "12;22;32", "13;23;33"])
        w.writerow(["PF/a.jpg", "PF/b.jpg", "8", "10;20", "11", "12;22", "13;23"])
    pairs, skips = load_pairs(tmp_path / "pascal.csv", images_root=tmp_path)
    assert len(pairs) == 1 and pairs[0].category == "cat" and sum(skips.pairs.values()) == 1
    assert pairs[0].target_points.tolist() == [[12, 13], [22, 23], [32, 33]]
    assert pairs[0].target_bbox == (12, 13, 32, 33)  # the keypoints' extent

    with open(tmp_path / "willow.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["imageA", "imageB"] + [f"c{i}" for i in range(40)])
        w.writerow(["PF-dataset/duck(S)/a.png", "PF-dataset/duck(S)/b.png"] + list(range(40)))
    pairs, _ = load_pairs(tmp_path / "willow.csv")
    assert pairs[0].category == "duck(S)"
    assert pairs[0].source_points[1].tolist() == [1, 11] and pairs[0].target_points[0].tolist() == [20, 30]
    with pytest.raises(ValueError, match="must be a .json"):
        load_pairs(tmp_path / "pairs.txt")


# ---------------------------------------------------------------------------------------------
# The runner


class OracleFeatures:
    """Features that encode each pixel's position in its category's canonical photo: a correct
    pipeline (resize, upsampling, x/y order, coordinates) must transfer every keypoint to within a
    few pixels, so PCK@0.05 is 100 %. Any flip or transpose of coordinates breaks that."""

    name = "oracle"
    key = "oracle-v1"

    def __init__(self, spair, grid=32):
        self.warps, self.decoded, self.grid = spair["warps"], spair["decoded"], grid
        self.sizes = {cat: img.size for n, (cat, img, _) in self.warps.items() if n.endswith("_src.jpg")}
        self.calls = 0

    def features(self, image, category):
        self.calls += 1
        cat, _, fwd = self.warps[self.decoded[pixels_key(image)]]
        w, h = image.size
        ys, xs = np.meshgrid((np.arange(self.grid) + 0.5) * h / self.grid - 0.5,
                             (np.arange(self.grid) + 0.5) * w / self.grid - 0.5, indexing="ij")
        pix = np.stack([xs.ravel(), ys.ravel()], 1)
        # invert the (affine) forward map numerically from three points
        base = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        img_pts = fwd(base)
        a = np.stack([img_pts[1] - img_pts[0], img_pts[2] - img_pts[0]], 1)
        canon = (pix - img_pts[0]) @ np.linalg.inv(a).T
        cw, ch = self.sizes[cat]
        u, v = canon[:, 0] / cw, canon[:, 1] / ch
        f = [fn(np.pi * k * c) for k in (1, 2, 4, 8) for c in (u, v) for fn in (np.cos, np.sin)]
        return torch.tensor(np.stack(f, 0).reshape(-1, self.grid, self.grid), dtype=torch.float32)

    def describe(self):
        return {"method": self.name, "tap": "none"}


def test_runner_transfers_known_warps_exactly_and_counts_every_skip(spair, tmp_path):
    pairs, skips = load_spair(spair["root"])
    source = OracleFeatures(spair)
    run = evaluate(pairs, source, cache_dir=tmp_path / "cache", journal=tmp_path / "j.jsonl", skips=skips,
                   progress=False)
    s = summarize(run.results)
    assert s["counts"]["pairs"] == len(spair["truth"]) + 1  # the pair with one keypoint outside still counts
    for kind in ("bbox", "img"):
        for a in ("0.05", "0.1", "0.15"):
            assert s["pck"][kind][a] == {"point": 100.0, "image": 100.0}, (kind, a)
    by_id = {r.pair_id: r for r in run.results}
    for pid, (_, target_points) in spair["truth"].items():
        assert by_id[pid].distances.max() < 6.0  # 32x32 features of a ~450 px image: a few pixels at most
        assert np.allclose(np.linalg.norm(by_id[pid].predictions - target_points, axis=1), by_id[pid].distances,
                           atol=1e-3)
    assert run.skips.pairs["image cannot be decoded"] == 1
    assert run.skips.pairs["image file missing"] == 1
    assert run.skips.pairs["image size differs from its annotation"] == 1
    assert run.skips.keypoints["keypoint outside its image"] == 1
    assert run.images_extracted == 5 and source.calls == 5  # each image once, whatever the number of pairs

    # Rerun: every scored pair comes from the journal, no feature is recomputed, results are identical;
    # the 3 skipped pairs are checked again (issue 29: an image missing then may be there now)
    again = evaluate(pairs, OracleFeatures(spair), cache_dir=tmp_path / "cache", journal=tmp_path / "j.jsonl",
                     skips=load_spair(spair["root"])[1], progress=False)
    assert again.resumed_pairs == len(pairs) - 3 and again.images_extracted == 0
    assert summarize(again.results) == s and again.skips.pairs == run.skips.pairs

    # Without the journal, features come from the disk cache; the closed-form transfer agrees.
    fresh = OracleFeatures(spair)
    cached = evaluate(pairs, fresh, cache_dir=tmp_path / "cache", progress=False, method="analytic")
    assert fresh.calls == 0 and cached.images_extracted == 0
    assert summarize(cached.results)["pck"] == s["pck"]
    assert all(np.allclose(a.distances, b.distances, atol=1e-3) for a, b in zip(cached.results, run.results))


def test_runner_resumes_an_interrupted_run(spair, tmp_path):
    pairs, _ = load_spair(spair["root"], categories=["cat"])
    evaluate(pairs[:2], OracleFeatures(spair), journal=tmp_path / "j.jsonl", progress=False)
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"pair_id": "cut sho')  # the line being written when the run was killed
    run = evaluate(pairs, OracleFeatures(spair), journal=tmp_path / "j.jsonl", progress=False)
    assert run.resumed_pairs == 2 and len(run.results) + sum(run.skips.pairs.values()) == len(pairs)
    with pytest.raises(ValueError, match="belongs to another run"):
        other = OracleFeatures(spair)
        other.key = "something else"
        evaluate(pairs, other, journal=tmp_path / "j.jsonl", progress=False)


def test_engine_without_the_requested_tap_is_refused():
    class Engine:
        taps = ("us3", "us9")

        def extract(self, images, taps=None):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"no tap 'us6' \(it has us3, us9\).*--taps us6"):
        EngineFeatures(Engine(), "us6", key="e")
    with pytest.raises(ValueError, match="unknown tap"):
        EngineFeatures(Engine(), "us66", key="e")


@pytest.fixture(scope="module")
def tiny_extractor(tiny_student, tiny_base):
    from cleandift_rt.features.extractor import ReferenceExtractor

    return ReferenceExtractor(tiny_student, tiny_base, size=128)


def test_real_model_pck_equals_an_independent_computation(spair, tiny_extractor, tiny_base, tmp_path):
    pairs, _ = load_spair(spair["root"])
    pairs = [p for p in pairs if p.pair_id in spair["truth"] and "small" not in p.pair_id]  # 3 pairs, 4 images
    source = EngineFeatures(tiny_extractor, "us6", key="tiny", prompt="a photo of a {category}", text_model=tiny_base)
    run = evaluate(pairs, source, cache_dir=tmp_path / "cache", progress=False)
    got = summarize(run.results, inclusive=True)

    # Independently: features straight from the extractor, full-size upsampling, brute-force argmax.
    hits = {0.05: [], 0.1: [], 0.15: []}
    per_image = {0.05: [], 0.1: [], 0.15: []}
    feats = {}

    def independent_features(path, category):
        if path not in feats:
            embeds = tiny_base.encode_prompt(f"a photo of a {category}")
            feats[path] = tiny_extractor.extract([Image.open(path).convert("RGB")], taps="us6",
                                                 prompt_embeds=embeds)["us6"][0]
        return feats[path]

    for p in pairs:
        sk, tk = spair["truth"][p.pair_id]
        imgs = [Image.open(p.source), Image.open(p.target)]
        f = [independent_features(p.source, p.category), independent_features(p.target, p.category)]
        pred = _brute_force_transfer(f[0], f[1], imgs[0].size, imgs[1].size, sk)
        err = np.sqrt(((pred - tk) ** 2).sum(1))
        x1, y1, x2, y2 = json.loads((spair["root"] / "PairAnnotation" / "test" / f"{p.pair_id}.json").read_text())["trg_bndbox"]
        for a in hits:
            ok = [e <= a * max(x2 - x1, y2 - y1) for e in err]
            hits[a] += ok
            per_image[a].append(sum(ok) / len(ok))
    for a in hits:
        assert got["pck"]["bbox"][alpha_key(a)]["point"] == pytest.approx(100 * sum(hits[a]) / len(hits[a]), abs=1e-9)
        assert got["pck"]["bbox"][alpha_key(a)]["image"] == pytest.approx(100 * np.mean(per_image[a]), abs=1e-9)
    assert got["counts"]["keypoints"] == sum(len(spair["truth"][p.pair_id][0]) for p in pairs)


def test_report_json_csv_and_table(spair, tmp_path):
    pairs, skips = load_spair(spair["root"])
    main = evaluate(pairs, OracleFeatures(spair), skips=skips, progress=False)
    base_src = OracleFeatures(spair)
    base_src.name, base_src.key, base_src.grid = "coarse", "oracle-coarse", 4
    baseline = evaluate(pairs, base_src, progress=False)
    doc = results_document(main, baseline, {"benchmark": "SPair-71k test", "split": "test"}, (0.05, 0.1, 0.15), True)
    write_results(doc, tmp_path / "r.json", tmp_path / "r.csv")
    back = json.loads((tmp_path / "r.json").read_text())
    for kind in ("bbox", "img"):
        for a in ("0.05", "0.1", "0.15"):
            assert set(back["pck"][kind][a]) == {"point", "image"}
    assert back["counts"]["pairs"] == 6 and back["counts"]["keypoints"] == 6 * 12
    assert back["counts"]["skipped"]["pairs"]["image cannot be decoded"] == 1
    assert set(back["per_category"]) == {"cat", "coffee"} and back["per_category"]["coffee"]["pairs"] == 2
    assert back["baseline"]["method"]["method"] == "coarse" and back["protocol"]["comparison"] == "<="
    assert back["baseline"]["pck"]["bbox"]["0.05"]["point"] < 100.0  # 4x4 features cannot be that precise
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert {r["method"] for r in rows} == {"oracle", "coarse"}
    row = next(r for r in rows if (r["method"], r["category"], r["kind"], r["alpha"], r["average"]) ==
               ("oracle", "all", "bbox", "0.1", "point"))
    assert float(row["pck"]) == 100.0 and row["pairs"] == "6"
    table = format_table(doc)
    assert "oracle" in table and "coarse" in table and "per image" in table and "image cannot be decoded" in table
