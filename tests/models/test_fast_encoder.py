"""Fast-encoder folders (models.fast_encoder): the diffusers layout, the record, and every refusal named."""

from __future__ import annotations

import json

import pytest
import torch

from cleandift_rt.checkpoint import write_safetensors
from cleandift_rt.models.fast_encoder import (RECORD_FILE, WEIGHTS_FILE, check_pairing, load_fast_encoder,
                                              pairing_warning, read_autoencoder)
from fast_encoder_fixtures import write_encoder, write_raw_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tiny_base):
    return write_encoder(tmp_path_factory.mktemp("enc") / "enc", tiny_base)


def test_folder_is_a_diffusers_autoencoder_tiny_with_its_record(encoder_dir, tiny_base):
    from diffusers import AutoencoderTiny

    encoder = load_fast_encoder(encoder_dir)
    record = json.loads((encoder_dir / RECORD_FILE).read_text())
    assert record["hash"] == encoder.identity and record["base"]["scaling_factor"] == tiny_base.scaling_factor
    assert record["base"]["name"] == tiny_base_name(tiny_base) and len(record["base"]["vae_hash"]) == 32
    plain = AutoencoderTiny.from_pretrained(encoder_dir, local_files_only=True)  # what diffusers users load
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encoder(pixels), plain.encode(pixels).latents * plain.config.scaling_factor)
    assert encoder(pixels).shape == (2, 4, 8, 8)
    assert check_pairing(encoder, tiny_base) == []
    assert encoder.describe()["parameters"] == sum(p.numel() for p in plain.encoder.parameters())


def tiny_base_name(base) -> str:
    from pathlib import Path

    return Path(base.source).name


def test_missing_raw_and_edited_folders_are_named(encoder_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="fast encoder folder .*nowhere does not exist: make one with "
                       "cleandift-rt distill-encoder"):
        load_fast_encoder(tmp_path / "nowhere")
    raw = write_raw_autoencoder(tmp_path / "taesd", encoder_dir)  # public TAESD weights look like this
    with pytest.raises(ValueError, match=f"has no {RECORD_FILE}: it was not measured on your images.*--init "
                       f".*taesd --steps 0"):
        load_fast_encoder(raw)
    assert read_autoencoder(raw).config.latent_channels == 4  # --init reads it as it is

    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("config.json", RECORD_FILE):
        (edited / name).write_bytes((encoder_dir / name).read_bytes())
    state = dict(read_autoencoder(encoder_dir).state_dict())
    state["encoder.layers.0.bias"] = state["encoder.layers.0.bias"] + 1
    write_safetensors(edited / WEIGHTS_FILE, state)
    with pytest.raises(ValueError, match="not the ones its cleandift_encoder.json describes"):
        load_fast_encoder(edited)

    (edited / WEIGHTS_FILE).unlink()
    (edited / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="has no diffusion_pytorch_model.safetensors .*a pickle, which is never loaded"):
        load_fast_encoder(edited)


def test_latent_channels_and_scale_must_be_the_bases(tiny_base, tmp_path):
    eight = load_fast_encoder(write_encoder(tmp_path / "eight", tiny_base, latent_channels=8))
    with pytest.raises(ValueError, match="gives 8 latent channels, base .* takes 4"):
        check_pairing(eight, tiny_base)
    sdxl_scale = load_fast_encoder(write_encoder(tmp_path / "xl", tiny_base, scaling_factor=0.13025, name="sdxl"))
    with pytest.raises(ValueError, match="imitates latents scaled by 0.13025 \\(the VAE of sdxl\\), base .* scales "
                       "its VAE's by 0.18215"):
        check_pairing(sdxl_scale, tiny_base)
    other_vae = load_fast_encoder(write_encoder(tmp_path / "other", tiny_base, vae_hash="0" * 32, name="sd15"))
    [warning] = check_pairing(other_vae, tiny_base)
    assert "distilled from another VAE (sd15)" in warning and "cleandift-rt compare" in warning


def test_untrusted_config_is_refused_before_anything_is_allocated(encoder_dir, tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    config = json.loads((encoder_dir / "config.json").read_text())
    (folder / WEIGHTS_FILE).write_bytes((encoder_dir / WEIGHTS_FILE).read_bytes())
    for change, message in (({"encoder_block_out_channels": [10**6] * 4}, "not a plausible value"),
                            ({"num_encoder_blocks": [1, 3]}, "4 levels of one width"),
                            ({"_class_name": "AutoencoderKL"}, "not an AutoencoderTiny"),
                            ({"latent_channels": 4, "encoder_block_out_channels": [16] * 4}, "mis-shaped keys")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            read_autoencoder(folder)


def test_pairing_warning_names_both_encoders(encoder_dir):
    encoder = load_fast_encoder(encoder_dir)
    assert pairing_warning(None, None, "s.safetensors") is None
    assert pairing_warning(encoder.reference(), encoder, "s.safetensors") is None
    unadapted = pairing_warning(None, encoder, "s.safetensors")
    assert "trained on latents of the base VAE's encoder but runs on fast encoder enc" in unadapted
    assert "--encoder DIR" in unadapted
    adapted = pairing_warning(encoder.reference(), None, "s.safetensors")
    assert f"fast encoder enc ({encoder.identity[:12]}) but runs on the base VAE's encoder" in adapted
