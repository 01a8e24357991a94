"""Base model loading (diffusers folder, single LDM file) and the release's student formats."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from cleandift_rt import ProjectionHeads
from cleandift_rt.checkpoint import write_safetensors
from cleandift_rt.models import (
    STUDENT_PREFIX, detect_variant, load_base, load_student, save_student_full, save_student_unet, write_tiny_base,
)
from ldm_format import to_ldm_state_dict


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_base_folder_layout(tiny_base_dir, tiny_base):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_base_dir / part).is_dir()
    assert json.loads((tiny_base_dir / "model_index.json").read_text())["cleandift_variant"] == "tiny"
    assert tiny_base.variant == "tiny" and tiny_base.resolution == 128
    assert tiny_base.alphas_cumprod.shape == (1000,)
    # scaled_linear betas 0.00085..0.012 (docs/method.md, training)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(tiny_base.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    assert tiny_base.encode_prompt(["", "a photo of a cat"]).shape == (2, 77, 32)


def test_write_tiny_base_is_seeded(tmp_path):
    a = load_base(write_tiny_base(tmp_path / "a", seed=5))
    b = load_base(write_tiny_base(tmp_path / "b", seed=5))
    c = load_base(write_tiny_base(tmp_path / "c", seed=6))
    assert _same_weights(a.unet, b.unet) and not _same_weights(a.unet, c.unet)
    assert detect_variant(load_base(write_tiny_base(tmp_path / "d", variant="tiny-sd15")).unet.config) == "tiny-sd15"


def test_unet_release_file_loads_strictly_into_diffusers(tiny_student_files, tiny_student):
    state = load_file(tiny_student_files["unet"])
    unet = UNet2DConditionModel.from_config(tiny_student.unet.config)
    unet.load_state_dict(state, strict=True)
    assert _same_weights(unet, tiny_student.unet)


def test_round_trip_both_formats(tiny_student_files, tiny_student, tiny_base):
    s_unet = load_student(tiny_student_files["unet"])
    assert _same_weights(s_unet.unet, tiny_student.unet) and s_unet.heads is None and s_unet.timestep == 261.0
    s_full = load_student(tiny_student_files["full"])
    assert _same_weights(s_full.unet, tiny_student.unet)
    assert _same_weights(s_full.heads, tiny_student.heads)
    keys = load_file(tiny_student_files["full"]).keys()
    assert "timestep" in keys and "time_emb.weight" in keys and "mapping.out_norm.scale" in keys
    assert any(k.startswith("unet_feature_extractor_base.") for k in keys)
    assert any(k.startswith("ae.encoder.") for k in keys)
    assert isinstance(ProjectionHeads.from_release(tiny_student_files["full"]), ProjectionHeads)


def test_release_files_without_config_need_the_base(tmp_path, tiny_student, tiny_base):
    # The public release's files carry no metadata: the base model supplies the architecture.
    path = tmp_path / "release_unet.safetensors"
    write_safetensors(path, tiny_student.unet.state_dict())
    with pytest.raises(ValueError, match="pass the base model"):
        load_student(path)
    assert _same_weights(load_student(path, base=tiny_base).unet, tiny_student.unet)


def test_full_timestep_is_read(tmp_path, tiny_student):
    path = tmp_path / "s_full.safetensors"
    save_student_full(path, tiny_student.unet, tiny_student.heads, torch.tensor(263.5))
    assert load_student(path).timestep == 263.5


@pytest.mark.parametrize("damage", ["missing", "unexpected", "misshaped"])
def test_student_key_problems_are_named(tmp_path, tiny_student, damage):
    state = dict(tiny_student.unet.state_dict())
    if damage == "missing":
        del state["conv_in.weight"]
        pattern = "missing keys: conv_in.weight"
    elif damage == "unexpected":
        state["extra.weight"] = torch.zeros(1)
        pattern = "unexpected keys: extra.weight"
    else:
        state["conv_in.weight"] = torch.zeros(3, 3)
        pattern = r"mis-shaped keys: conv_in.weight: expected \(32, 4, 3, 3\), got \(3, 3\)"
    path = tmp_path / "bad_unet.safetensors"
    save_student_unet(path, tiny_student.unet)
    meta = {"unet_config": json.dumps({k: v for k, v in dict(tiny_student.unet.config).items() if not k.startswith("_")})}
    write_safetensors(path, state, metadata=meta)
    with pytest.raises(ValueError, match=pattern):
        load_student(path)


def test_full_with_stray_or_headless_keys(tmp_path, tiny_student):
    state = {STUDENT_PREFIX + k: v for k, v in tiny_student.unet.state_dict().items()}
    state["optimizer.state"] = torch.zeros(1)
    write_safetensors(tmp_path / "stray.safetensors", state)
    with pytest.raises(ValueError, match="belong to no part"):
        load_student(tmp_path / "stray.safetensors")


def test_pickles_and_corrupt_files_are_refused(tmp_path, tiny_student):
    pkl = tmp_path / "student.safetensors"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="pickle"):
        load_student(pkl)
    zipped = tmp_path / "student.pt"
    torch.save({"a": torch.zeros(1)}, zipped)
    with pytest.raises(ValueError, match="pickle / torch.save"):
        load_student(zipped)
    good = tmp_path / "good.safetensors"
    save_student_unet(good, tiny_student.unet)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_student(truncated)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty or truncated"):
        load_student(empty)
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="is a folder, not a safetensors checkpoint"):
        load_student(tmp_path)


def test_base_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder: unet/config.json is missing"):
        load_base(tmp_path / "empty")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="must be a .safetensors"):
        load_base(ckpt)


@pytest.mark.parametrize("variant", ["tiny", "tiny-sd15"])
def test_single_file_ldm_checkpoint(tmp_path, variant):
    folder = load_base(write_tiny_base(tmp_path / "base", seed=4, variant=variant))
    path = tmp_path / "model.safetensors"
    write_safetensors(path, to_ldm_state_dict(folder))
    single = load_base(path)
    assert single.variant == variant
    assert _same_weights(single.unet, folder.unet) and _same_weights(single.vae, folder.vae)
    assert _same_weights(single.text_encoder, folder.text_encoder)
    # No vocabulary in a single file: the empty prompt is still exact, others ask for a tokenizer.
    torch.testing.assert_close(single.encode_prompt(""), folder.encode_prompt(""), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only the empty prompt works"):
        single.encode_prompt("a photo of a cat")
    with_tok = load_base(path, tokenizer=tmp_path / "base" / "tokenizer")
    torch.testing.assert_close(with_tok.encode_prompt("a cat"), folder.encode_prompt("a cat"), rtol=0, atol=0)


def test_single_file_that_is_not_sd(tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors(path, {"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="not an original-format Stable Diffusion"):
        load_base(path)


def test_written_files_get_normal_permissions(tmp_path, tiny_student):
    import os
    import stat

    path = tmp_path / "s.safetensors"
    save_student_unet(path, tiny_student.unet)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
