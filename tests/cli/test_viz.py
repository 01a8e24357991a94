"""Pictures: they exist, have the expected size, are not blank, and show what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift_rt.viz import colormap, draw_matches, feature_pca, pca_maps


def _not_blank(img: Image.Image) -> bool:
    img = img.convert("RGB")
    return np.asarray(img).std() > 10 and img.getcolors(maxcolors=1000) is None  # > 1000 distinct colours


def test_colormap_runs_from_purple_to_yellow():
    lo, mid, hi = colormap([0.0, 0.5, 1.0])
    assert lo == (68, 1, 84) and hi == (253, 231, 37) and mid == (33, 145, 140)


def test_matches_picture_has_expected_size_lines_and_legend(photos):
    a, b = photos["cat"], photos["cat"].transpose(Image.FLIP_LEFT_RIGHT)
    pa = np.array([[100, 100], [200, 150], [300, 200], [50, 250]], dtype=float)
    pb = np.stack([a.width - 1 - pa[:, 0], pa[:, 1]], 1)
    scores = np.array([0.9, 0.5, 0.7, 0.1])
    img = draw_matches(a, b, pa, pb, scores, max_lines=3, height=200, title="cat vs flipped cat")
    scale = 200 / a.height
    assert img.size == (10 + round(a.width * scale) + 12 + round(b.width * scale) + 10, 30 + 200 + 58 + 20)
    assert _not_blank(img)
    # the best match (0.9) is drawn in the top colour of the ramp at its endpoint in image A
    x, y = 10 + 100 * scale, 30 + 10 + 100 * scale
    assert img.getpixel((round(x), round(y))) == colormap([1.0])[0]
    # the least confident match (0.1) is not drawn: its A endpoint shows the photo, not a marker
    x, y = 10 + 50 * scale, 30 + 10 + 250 * scale
    assert img.getpixel((round(x), round(y))) not in colormap(np.linspace(0, 1, 5))
    # the legend's colour bar is there
    legend_y = 30 + 10 + 200 + 10 + 5
    row = [img.getpixel((x, legend_y)) for x in range(img.width - 210, img.width - 10)]
    assert row[0] == colormap([0.0])[0] and row[-1] == colormap([1.0])[0]


def test_matches_picture_rejects_bad_input(photos):
    a = photos["cat"]
    with pytest.raises(ValueError, match="come in pairs"):
        draw_matches(a, a, [[1, 2]], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="NaN"):
        draw_matches(a, a, [[np.nan, 2]], [[1, 2]])
    with pytest.raises(TypeError, match="PIL images or uint8"):
        draw_matches(np.zeros((10, 10)), a, [], [])


def test_pca_separates_a_synthetic_object_and_picture_is_not_blank(photos):
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(2):
        f = torch.randn(16, 12, 12, generator=g) * 0.05 + torch.tensor([1.0] + [0.0] * 15)[:, None, None]
        f[:, 3:9, 4:10] = torch.randn(16, 6, 6, generator=g) * 0.3 + torch.tensor([0.0, 1.0] + [0.0] * 14)[:, None, None]
        feats.append(f)
    maps = pca_maps(feats)
    for fg, rgb in maps:
        expected = np.zeros((12, 12), bool)
        expected[3:9, 4:10] = True
        assert (fg == expected).mean() > 0.95  # the object, not the border, is foreground
        assert rgb.shape == (12, 12, 3) and 0 <= rgb.min() and rgb.max() <= 1
    img = feature_pca(feats, [photos["cat"], photos["coffee"]], height=120, title="pca")
    w = 10 + round(photos["cat"].width * 120 / photos["cat"].height) + 10 + round(
        photos["coffee"].width * 120 / photos["coffee"].height) + 10
    assert img.size == (max(w, 420), 30 + 240 + 10 + 40 + 20)
    assert _not_blank(img)
    with pytest.raises(ValueError, match="same number of channels"):
        pca_maps([torch.zeros(4, 2, 2), torch.zeros(5, 2, 2)])
    with pytest.raises(ValueError, match="NaN"):
        pca_maps([torch.full((4, 2, 2), float("nan"))])
