"""The PyTorch reference extractor, input handling and the DIFT baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleandift_rt import TAPS, unet_taps
from cleandift_rt.features.extractor import DiftExtractor, ReferenceExtractor
from cleandift_rt.models import load_student
from cleandift_rt.features.preprocess import prepare_images


@pytest.fixture(scope="module")
def extractor(tiny_student_files, tiny_base):
    return ReferenceExtractor(load_student(tiny_student_files["full"]), tiny_base)


def test_features_are_the_student_taps_on_the_clean_latent(extractor, tiny_base, photos):
    images = [photos["cat"], photos["coffee"]]
    feats = extractor.extract(images)
    assert list(feats) == list(TAPS)
    # Written out by hand: resize, [-1, 1], VAE posterior mean * 0.18215, student at t=261 with "".
    pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((128, 128), 3), dtype=np.float32)).permute(2, 0, 1)
                          for im in images]) / 127.5 - 1
    with torch.no_grad():
        latents = tiny_base.vae.encode(pixels).latent_dist.mean * 0.18215
        ctx = tiny_base.encode_prompt(["", ""])
        ref = unet_taps(extractor.student.unet, latents, 261.0, ctx)
    for tap in TAPS:
        torch.testing.assert_close(feats[tap], ref[tap], rtol=0, atol=0)
    assert feats["us6"].shape == (2, 64, 8, 8) and feats["us10"].shape == (2, 32, 16, 16)


def test_deterministic_and_input_forms_agree(extractor, photos):
    cat = photos["cat"]
    arr = np.asarray(cat)
    a = extractor.extract([cat], taps=["us6"])["us6"]
    b = extractor.extract(arr, taps=["us6"])["us6"]
    c = extractor.extract(arr[None], taps=["us6"])["us6"]
    assert torch.equal(a, b) and torch.equal(a, c)
    x = prepare_images([cat], 128).pixels
    d = extractor.extract(x, taps=["us6"])["us6"]  # float NCHW already at model size: same pixels
    assert torch.equal(a, d)
    assert torch.equal(extractor.extract([cat], taps=["us6"])["us6"], a)


def test_taps_subset_equals_full(extractor, photos):
    full = extractor.extract([photos["cat"]])
    sub = extractor.extract([photos["cat"]], taps=["us8", "us2"])
    assert list(sub) == ["us2", "us8"]
    for tap in sub:
        assert torch.equal(sub[tap], full[tap])


def test_prompt_embeds(extractor, tiny_base, photos):
    emb = tiny_base.encode_prompt("a photo of a cat")
    a = extractor.extract([photos["cat"]], taps="us6", prompt_embeds=emb[0])["us6"]
    b = extractor.extract([photos["cat"]], taps="us6", prompt_embeds=emb)["us6"]
    default = extractor.extract([photos["cat"]], taps="us6")["us6"]
    assert torch.equal(a, b) and not torch.equal(a, default)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \[L, 32\]"):
        extractor.extract([photos["cat"]], prompt_embeds=torch.zeros(77, 31))
    with pytest.raises(ValueError, match="prompt_embeds contain NaN"):
        extractor.extract([photos["cat"]], prompt_embeds=torch.full((77, 32), float("nan")))


def test_project_uses_heads(extractor, photos):
    feats = extractor.extract([photos["cat"]], taps=["us6", "us10"])
    proj = extractor.project(feats, 500)
    heads = extractor.student.heads
    torch.testing.assert_close(proj["us6"], heads("us6", feats["us6"], 500), rtol=0, atol=0)
    assert not torch.allclose(proj["us6"], feats["us6"])


def test_pad_policy_geometry(photos):
    cat = photos["cat"]  # 451 x 300
    prep = prepare_images([cat], 128, policy="pad")
    geo = prep.geometry[0]
    assert (geo.content_width, geo.content_height) == (128, 85)
    assert torch.all(prep.pixels[0, :, 85:, :] == 0)  # padding is mid-grey
    assert prep.pixels.shape == (1, 3, 128, 128)
    stretched = prepare_images([cat], (128, 192)).geometry[0]
    assert stretched.scale_x == 192 / 451 and stretched.scale_y == 128 / 300


BAD_INPUTS = [
    ([], ValueError, "empty batch"),
    (torch.zeros(0, 3, 128, 128), ValueError, "empty batch"),
    (np.zeros((128, 128), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((128, 128, 4), np.uint8), ValueError, "convert grayscale/RGBA to RGB"),
    (np.zeros((128, 128, 3), np.int32), TypeError, "must be uint8"),
    (np.zeros((128, 128, 3), np.uint16), TypeError, "must be uint8"),
    (torch.zeros(3, 128, 128), ValueError, "B x 3 x H x W"),
    (torch.zeros(1, 1, 128, 128), ValueError, "B x 3 x H x W"),
    (torch.zeros(1, 3, 128, 128, dtype=torch.int64), TypeError, "floating point"),
    (torch.full((1, 3, 128, 128), float("nan")), ValueError, "NaN or Inf"),
    (torch.full((1, 3, 128, 128), float("inf")), ValueError, "NaN or Inf"),
    (torch.full((1, 3, 128, 128), 255.0), ValueError, r"must lie in \[-1, 1\]"),
    (np.zeros((32, 128, 3), np.uint8), ValueError, "at least 64 px"),
    (torch.zeros(1, 3, 48, 128), ValueError, "at least 64 px"),
    ("cat.jpg", TypeError, "unsupported image batch type"),
    ([np.zeros((128, 128, 3), np.float32)], TypeError, "float images go in one NCHW"),
]


@pytest.mark.parametrize("images,error,pattern", BAD_INPUTS)
def test_bad_images(extractor, images, error, pattern):
    with pytest.raises(error, match=pattern):
        extractor.extract(images)


def test_bad_settings(tiny_base, tiny_student_files, photos):
    student = load_student(tiny_student_files["unet"])
    with pytest.raises(ValueError, match="multiples of 64"):
        ReferenceExtractor(student, tiny_base, size=100)
    with pytest.raises(ValueError, match="unknown resize policy"):
        ReferenceExtractor(student, tiny_base, resize="crop")
    ex = ReferenceExtractor(student, tiny_base)
    with pytest.raises(ValueError, match="unknown tap"):
        ex.extract([photos["cat"]], taps=["us11"])
    with pytest.raises(ValueError, match="no projection heads"):
        ex.project(ex.extract([photos["cat"]], taps="us6"), 100)


def test_dift_baseline(tiny_base, photos):
    dift = DiftExtractor(tiny_base, t=261, ensemble=3, seed=7)
    a = dift.extract([photos["cat"]])
    assert list(a) == ["us6"] and a["us6"].shape == (1, 64, 8, 8)
    assert torch.equal(dift.extract([photos["cat"]])["us6"], a["us6"])  # seeded
    other = DiftExtractor(tiny_base, t=261, ensemble=3, seed=8).extract([photos["cat"]])["us6"]
    assert not torch.equal(other, a["us6"])
    clean = DiftExtractor(tiny_base, t=0, ensemble=1, seed=7).extract([photos["cat"]])["us6"]
    assert not torch.allclose(clean, a["us6"])
    with pytest.raises(ValueError, match="timestep t=1000"):
        DiftExtractor(tiny_base, t=1000)
    with pytest.raises(ValueError, match="ensemble size"):
        DiftExtractor(tiny_base, ensemble=0)


def test_load_image_applies_exif_orientation(tmp_path, photos):
    from PIL import Image

    from cleandift_rt.features.preprocess import load_image

    stored = photos["cat"]  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").size == (300, 451)
    assert load_image(tmp_path / "phone.jpg", exif_orientation=False).size == (451, 300)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")
