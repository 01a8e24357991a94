"""runtime.compare: per-tap cosine, relative error and match agreement of two engines' maps, checked on
maps whose answers are known (scaled, permuted, other channels, other grids)."""

from __future__ import annotations

import numpy as np
import pytest

from cleandift_rt.runtime.compare import FeatureComparison, common_taps, image_cosines, max_rel_errors, nearest, worst


def maps(n: int, c: int = 8, h: int = 4, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def run(a: dict, b: dict) -> dict:
    comparison = FeatureComparison(list(a))
    for i in range(len(next(iter(a.values())))):
        comparison.add({t: a[t][i] for t in a}, {t: b[t][i : i + 1] for t in b})  # [C,h,w] and [1,C,h,w] alike
    return comparison.result()


def test_scaled_maps_agree_everywhere_and_show_their_relative_error():
    a = maps(3)
    r = run({"us6": a}, {"us6": 2 * a})["us6"]
    assert r["cosine_min"] == pytest.approx(1, abs=1e-12) and r["cosine_mean"] == pytest.approx(1, abs=1e-12)
    assert r["max_rel_error"] == pytest.approx(1.0) and r["match_agreement"] == 1.0
    assert r["shape_a"] == r["shape_b"] == [8, 4, 5]


def test_cosine_min_mean_and_agreement_count_what_differs():
    a, noise = maps(4), maps(4, seed=1)
    b = a.copy()
    b[2] = noise[2]  # image 2 unrelated: its cosine is about 0, and matches from and to it mostly differ
    r = run({"mid": a}, {"mid": b})["mid"]
    cos = image_cosines(a, b)
    assert r["cosine_min"] == pytest.approx(cos.min()) and r["cosine_mean"] == pytest.approx(cos.mean())
    assert abs(r["cosine_min"]) < 0.5 and cos[[0, 1, 3]] == pytest.approx(1)
    # pairs 0->1, 1->2, 2->3, 3->0: the two pairs touching image 2 disagree where their nearest neighbours do
    expected = [nearest(a[i], a[j]) == nearest(b[i], b[j]) for i, j in ((0, 1), (1, 2), (2, 3), (3, 0))]
    assert r["match_agreement"] == pytest.approx(np.concatenate(expected).mean())
    assert r["match_agreement"] < 1 and np.concatenate([expected[0], expected[3]]).all()


def test_other_channels_have_no_cosine_but_an_agreement_and_other_grids_neither():
    a = maps(2)
    wider = np.concatenate([a, a], axis=1)  # the same directions in twice the channels: the same matches
    r = run({"us6": a}, {"us6": wider})["us6"]
    assert r["cosine_min"] is None and r["max_rel_error"] is None and r["match_agreement"] == 1.0
    r = run({"us6": a}, {"us6": maps(2, h=2)})["us6"]
    assert r["cosine_min"] is None and r["match_agreement"] is None


def test_helpers():
    a = maps(2)
    assert max_rel_errors(a, a).tolist() == [0.0, 0.0]
    bad = a.copy()
    bad[1, 0, 0, 0] = np.nan
    assert np.isnan(image_cosines(a, bad)[1]) and not np.isnan(image_cosines(a, bad)[0])
    assert worst({"a": {"c": 0.9}, "b": {"c": float("nan")}, "d": {"c": None}}, "c")[0] == "b"
    assert common_taps(("mid", "us6"), ("us6", "us8")) == ["us6"]
    with pytest.raises(ValueError, match="engine B has no mid"):
        common_taps(("mid", "us6"), ("us6",), ["mid"])
    with pytest.raises(ValueError, match="share no tap"):
        common_taps(("mid",), ("us6",))
