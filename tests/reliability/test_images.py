"""One decoder for photos: every Pillow mode becomes correct 8-bit RGB, or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cleandift_rt.features.preprocess import load_image, prepare_images, rgb8


def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depthlike.png"
    Image.fromarray(_gradient16()).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))
    want = np.round(_gradient16() / 257).astype(np.uint8)
    assert rgb.shape == (80, 96, 3) and np.abs(rgb[..., 0].astype(int) - want).max() <= 1
    assert (rgb == 255).mean() < 0.01  # Pillow's convert("RGB") makes 99.6% of it white
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    in_memory = prepare_images([Image.open(path)], (64, 64)).pixels
    from_file = prepare_images([load_image(path)], (64, 64)).pixels
    assert np.array_equal(in_memory.numpy(), from_file.numpy())


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"])
def test_other_modes_follow_pillows_rgb_conversion(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(np.asarray(rgb8(image)), np.asarray(image.convert("RGB")))


def test_float_and_32_bit_images(tmp_path):
    unit = Image.fromarray(np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32))
    assert np.asarray(rgb8(unit))[..., 0].max() == 255
    with pytest.raises(ValueError, match=r"floating-point pixels \(mode F\) with values in \[4, 4\]"):
        rgb8(Image.fromarray(np.full((64, 64), 4.0, np.float32)))
    with pytest.raises(ValueError, match="outside 0..65535"):
        rgb8(Image.fromarray(np.full((64, 64), 10**6, np.int32)))
    with pytest.raises(ValueError, match="cannot convert mode La"):
        rgb8(Image.new("La", (64, 64)))


def test_broken_files_and_folders_are_named(tmp_path, photos):
    good = tmp_path / "cat.jpg"
    photos["cat"].save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ValueError, match="cannot decode image .*cut.jpg"):
        load_image(cut)
    with pytest.raises(ValueError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "nope.png")
