"""Fusion (docs/method.md, zero-shot fusion): DINOv2 through transformers with hub-style position interpolation, torch-hub
checkpoints, the tale / tlfr descriptors, the window soft-argmax, SPair's left/right permutation, the
adaptive flip, and eval-spair / match with a recipe. Tiny random models with the real topologies
(a saved transformers Dinov2Model folder, the tiny SD 2.1-topology student) go through the same
code as real weights; every numeric path is checked against an independent computation."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cleandift_rt.fusion import LEFT_RIGHT_PAIRS, SIDES, TALE, TLFR, Dinov2Features, Fusion, flipped_source_points, fuse
from cleandift_rt.fusion.canvas import placement, square_canvas
from cleandift_rt.fusion.dinov2 import IMAGENET_MEAN, IMAGENET_STD, hub_position_embeddings
from cleandift_rt.fusion.flip import fit_distance, mirror_partner
from cleandift_rt.fusion.recipes import joint_pca
from cleandift_rt.fusion.sd import SdTaps
from cleandift_rt.kernels.refine import soft_argmax

HIDDEN, LAYERS, HEADS = 32, 2, 2
SMALL = {"dino_size": 112, "sd_size": 128, "sd_crop": 64}  # 8 x 8 descriptor grids; the engine runs at 64 px


def _tiny_dino_config():
    from transformers import Dinov2Config

    return Dinov2Config(image_size=518, patch_size=14, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A saved transformers Dinov2Model (random weights, real topology at a tiny width)."""
    from transformers import Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(_tiny_dino_config()).eval()
    with torch.no_grad():  # layer scale 1.0 and zero biases would hide mistakes in their mapping
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine_args(tiny_student_files, tiny_base_dir):
    return ["--engine", str(tiny_student_files["unet"]), "--base", str(tiny_base_dir), "--size", "64", "64"]


@pytest.fixture(scope="module")
def engine(student_engine):
    return student_engine(64)


def _normalized(canvas):
    return (canvas - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# DINOv2


def test_native_grid_equals_transformers_hidden_states(dino_dir, photos):
    from transformers import Dinov2Model

    dino = Dinov2Features(dino_dir, size=518)
    canvas, places = square_canvas([photos["cat"], photos["coffee"]], 518)
    ours = dino.canvas_features(canvas)
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    with torch.no_grad():
        out = model(_normalized(canvas), output_hidden_states=True)
    want = out.hidden_states[-1][:, 1:].reshape(2, 37, 37, HIDDEN).permute(0, 3, 1, 2)
    assert ours.shape == (2, HIDDEN, 37, 37)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, out.last_hidden_state[:, 1:].reshape(2, 37, 37, HIDDEN).permute(0, 3, 1, 2),
                              atol=1e-3)  # the LayerNorm'd tokens are something else
    # the public face: images as Engine.extract takes them; numpy out unless torch in
    got = dino.features([np.asarray(photos["cat"])])
    assert isinstance(got, np.ndarray) and np.allclose(got[0], ours[0].numpy(), atol=1e-6)
    assert places[0].content_width == 518 and places[0].offset_y == (518 - round(518 * 300 / 451)) // 2


def _cubic(t):
    a = -0.75  # PyTorch's bicubic kernel (Keys, a = -0.75)
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_last_axis(arr: np.ndarray, out_len: int, scale: float) -> np.ndarray:
    """Bicubic along the last axis with source position (j + 0.5) / scale - 0.5, borders replicated."""
    n = arr.shape[-1]
    out = np.zeros(arr.shape[:-1] + (out_len,))
    for j in range(out_len):
        src = (j + 0.5) / scale - 0.5
        f = math.floor(src)
        for k, w in enumerate(_cubic(src - f)):
            out[..., j] += w * arr[..., min(max(f - 1 + k, 0), n - 1)]
    return out


def _independent_hub_embeddings(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """torch-hub's interpolation written out: bicubic, scale (grid + 0.1) / side, no antialias."""
    side, dim = 37, pos.shape[-1]
    patch = pos[0, 1:].double().numpy().reshape(side, side, dim).transpose(2, 0, 1)  # [D, H, W]
    scale = (grid + 0.1) / side
    rows = _resize_last_axis(patch.transpose(0, 2, 1), grid, scale).transpose(0, 2, 1)  # along H
    both = _resize_last_axis(rows, grid, scale)  # along W
    flat = torch.from_numpy(both.reshape(dim, -1).T).float()[None]
    return torch.cat([pos[:, :1], flat], dim=1)


def test_hub_interpolation_matches_an_independent_computation(dino_dir, photos):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dino_dir).eval()
    pos = model.embeddings.position_embeddings.detach()
    for grid in (8, 12, 60):
        ours = hub_position_embeddings(pos, grid, grid)
        torch.testing.assert_close(ours, _independent_hub_embeddings(pos, grid), atol=2e-6, rtol=0)
    assert hub_position_embeddings(pos, 37, 37) is pos  # the checkpoint's own grid: no interpolation
    # The whole model at 12 x 12 patches: transformers' forward with the independent embeddings
    # patched in gives our features; its own exact-size interpolation gives others.
    dino = Dinov2Features(dino_dir, size=168)
    canvas, _ = square_canvas([photos["astronaut"]], 168)
    ours = dino.canvas_features(canvas)
    independent = _independent_hub_embeddings(pos, 12)
    with torch.no_grad():
        plain = model(_normalized(canvas), output_hidden_states=True).hidden_states[-1]
        model.embeddings.interpolate_pos_encoding = lambda embeddings, h, w: independent
        patched = model(_normalized(canvas), output_hidden_states=True).hidden_states[-1]
    as_map = lambda h: h[:, 1:].reshape(1, 12, 12, HIDDEN).permute(0, 3, 1, 2)  # noqa: E731
    torch.testing.assert_close(ours, as_map(patched), atol=1e-5, rtol=0)
    assert (ours - as_map(plain)).abs().max() > 1e-4  # the two interpolations really differ


def _hub_state(hidden=64, depth=2, swiglu=False, seed=0):
    """A random torch-hub DINOv2 state dict (the hub's key names and shapes)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"cls_token": r(1, 1, hidden), "mask_token": r(1, hidden), "pos_embed": r(1, 1370, hidden, scale=0.5),
          "patch_embed.proj.weight": r(hidden, 3, 14, 14), "patch_embed.proj.bias": r(hidden),
          "norm.weight": 1 + r(hidden), "norm.bias": r(hidden)}
    mlp = (int(4 * hidden * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(hidden), b + "norm1.bias": r(hidden), b + "norm2.weight": 1 + r(hidden),
                   b + "norm2.bias": r(hidden), b + "attn.qkv.weight": r(3 * hidden, hidden, scale=0.3),
                   b + "attn.qkv.bias": r(3 * hidden), b + "attn.proj.weight": r(hidden, hidden, scale=0.2),
                   b + "attn.proj.bias": r(hidden), b + "ls1.gamma": 0.5 + r(hidden), b + "ls2.gamma": 0.5 + r(hidden)})
        if swiglu:
            sd.update({b + "mlp.w12.weight": r(2 * mlp, hidden, scale=0.2), b + "mlp.w12.bias": r(2 * mlp),
                       b + "mlp.w3.weight": r(hidden, mlp, scale=0.2), b + "mlp.w3.bias": r(hidden)})
        else:
            sd.update({b + "mlp.fc1.weight": r(4 * hidden, hidden, scale=0.2), b + "mlp.fc1.bias": r(4 * hidden),
                       b + "mlp.fc2.weight": r(hidden, 4 * hidden, scale=0.2), b + "mlp.fc2.bias": r(hidden)})
    return sd


def _hub_forward(sd, pixels, grid, depth=2, heads=1, swiglu=False):
    """The hub ViT written out from its state dict: the tokens after the last block, before ``norm``."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1)
    x = x + (sd["pos_embed"] if grid == 37 else _independent_hub_embeddings(sd["pos_embed"], grid))
    b, t, d = x.shape
    for i in range(depth):
        p = lambda name, i=i: sd[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        x = x + p("ls1.gamma") * (att.transpose(1, 2).reshape(b, t, d) @ p("attn.proj.weight").T + p("attn.proj.bias"))
        h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        if swiglu:
            gate, value = (h @ p("mlp.w12.weight").T + p("mlp.w12.bias")).chunk(2, -1)
            h = (F.silu(gate) * value) @ p("mlp.w3.weight").T + p("mlp.w3.bias")
        else:
            h = F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
        x = x + p("ls2.gamma") * h
    return x[:, 1:].reshape(b, grid, grid, d).permute(0, 3, 1, 2)


@pytest.mark.parametrize("swiglu", [False, True], ids=["vit-s-b-l", "vit-g-swiglu"])
def test_hub_checkpoint_converts_on_load(tmp_path, photos, swiglu):
    from safetensors.torch import save_file

    sd = _hub_state(swiglu=swiglu)
    save_file(sd, tmp_path / "hub.safetensors")
    canvas, _ = square_canvas([photos["cat"]], 168)
    for size, grid in ((518, 37), (168, 12)):
        dino = Dinov2Features(tmp_path / "hub.safetensors", size=size)
        assert dino.channels == 64 and dino.grid == grid
        c = canvas if size == 168 else square_canvas([photos["cat"]], 518)[0]
        want = _hub_forward(sd, _normalized(c), grid, swiglu=swiglu)
        # fp32 against fp32 computed another way; random weights amplify rounding: 1e-4 of the range
        torch.testing.assert_close(dino.canvas_features(c), want, atol=1e-4 * float(want.abs().max()), rtol=0)
    torch.save(sd, tmp_path / "hub.pth")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        Dinov2Features(tmp_path / "hub.pth", size=168)
    pickled = Dinov2Features(tmp_path / "hub.pth", size=168, allow_pickle=True)
    torch.testing.assert_close(pickled.canvas_features(canvas), dino.canvas_features(canvas), atol=0, rtol=0)


@pytest.mark.parametrize("swiglu", [False, True])
def test_hub_checkpoint_converts_to_the_transformers_4_names_too(swiglu):
    """transformers 4.x names DINOv2's modules differently; 5.x's own conversion table (legacy -> new)
    applied to our 4.x names must give our 5.x names and tensors."""
    from transformers import Dinov2Model

    from cleandift_rt.fusion.hub_checkpoint import hub_config, hub_to_transformers

    sd = _hub_state(swiglu=swiglu)
    config = hub_config(sd)
    new = hub_to_transformers(sd, config, Dinov2Model(config).state_dict().keys())
    old = hub_to_transformers(sd, config, ["encoder.layer.0.attention.attention.query.weight"])
    renamed = {}
    for key, value in old.items():
        for legacy, current in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                                ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
                                ("mlp.weights_out", "mlp.down_proj")):
            key = key.replace(legacy, current)
        if "mlp.weights_in" in key:
            gate, up = value.chunk(2, dim=0)
            renamed[key.replace("weights_in", "gate_proj")], renamed[key.replace("weights_in", "up_proj")] = gate, up
        else:
            renamed[key] = value
    assert renamed.keys() == new.keys() and all(torch.equal(renamed[k], new[k]) for k in new)


def test_dinov2_errors_name_the_problem(tmp_path, dino_dir):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="do not exist"):
        Dinov2Features(tmp_path / "nope")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        Dinov2Features(dino_dir, size=100)
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a torch-hub DINOv2 checkpoint"):
        Dinov2Features(tmp_path / "other.safetensors")
    sd = _hub_state()
    save_file({**sd, "register_tokens": torch.zeros(1, 4, 64)}, tmp_path / "reg.safetensors")
    with pytest.raises(ValueError, match="register tokens"):
        Dinov2Features(tmp_path / "reg.safetensors")
    del sd["blocks.1.ls2.gamma"]
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="lacks 'blocks.1.ls2.gamma'"):
        Dinov2Features(tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors"):
        Dinov2Features(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Descriptors


def _raw(seed, grid=6, sd=(24, 40, 40), dino=16):
    g = torch.Generator().manual_seed(seed)
    return {"us8": torch.randn(sd[0], grid, grid, generator=g) + 1, "us5": torch.randn(sd[1], grid // 2, grid // 2, generator=g),
            "us2": torch.randn(sd[2], grid // 4 + 1, grid // 4 + 1, generator=g), "dino": torch.randn(dino, grid, grid, generator=g) * 3}


def test_fusion_normalises_every_part_and_the_whole():
    raws = [_raw(1), _raw(2)]
    for desc in fuse(TLFR, raws):
        assert desc.shape == (24 + 40 + 40 + 16, 6, 6)
        torch.testing.assert_close(desc.norm(dim=0), torch.ones(6, 6))  # the whole: unit
        torch.testing.assert_close(desc[:104].norm(dim=0), torch.full((6, 6), 0.5 ** 0.5))  # parts equal before it
        torch.testing.assert_close(desc[104:].norm(dim=0), torch.full((6, 6), 0.5 ** 0.5))
    parts_only = fuse(replace(TLFR, normalize_whole=False), raws)[0]
    torch.testing.assert_close(parts_only[:104].norm(dim=0), torch.ones(6, 6))
    torch.testing.assert_close(parts_only[104:].norm(dim=0), torch.ones(6, 6))
    # tlfr's channels: us8, then us5 and us2 bilinearly upsampled to the grid, then DINO
    want_us5 = F.interpolate(raws[0]["us5"][None], size=(6, 6), mode="bilinear", align_corners=False)[0]
    sd = torch.cat([raws[0]["us8"], want_us5, F.interpolate(raws[0]["us2"][None], size=(6, 6), mode="bilinear")[0]])
    torch.testing.assert_close(parts_only[:104], F.normalize(sd, dim=0))
    for desc in fuse(TALE, raws):
        assert desc.shape[0] == 24 + 40 + 40 + 16  # PCA to min(256, C) per map
        torch.testing.assert_close(desc[:104].norm(dim=0), torch.ones(6, 6))
        torch.testing.assert_close(desc[104:].norm(dim=0), torch.ones(6, 6))
    no_dino = fuse(replace(TLFR, dino=False), raws)[0]
    assert no_dino.shape == (104, 6, 6)
    torch.testing.assert_close(no_dino.norm(dim=0), torch.ones(6, 6))


def test_pca_fusion_is_symmetric_in_the_pair_and_a_true_pca():
    a, b = _raw(3), _raw(4)
    ab, ba = fuse(TALE, [a, b]), fuse(TALE, [b, a])
    assert torch.equal(ab[0], ba[1]) and torch.equal(ab[1], ba[0])
    maps = [a["us5"], b["us5"]]
    proj = joint_pca(maps, 4)
    x = torch.cat([m.flatten(1).T for m in maps]).double()
    xc = x - x.mean(0)
    _, _, vt = torch.linalg.svd(xc, full_matrices=False)  # independent: the SVD of the centred cells
    got = torch.cat([p.flatten(1).T for p in proj]).double()
    for k in range(4):
        want = xc @ vt[k]
        assert torch.allclose(got[:, k].abs(), want.abs(), atol=1e-4), k  # a component, up to its sign
    assert torch.all(got.var(0)[:-1] >= got.var(0)[1:])  # in order of explained variance


# ---------------------------------------------------------------------------------------------
# Window soft-argmax


def _brute_force_soft_argmax(src, dst, index, window, temperature, outside):
    _, _, h, w = dst.shape
    sims = F.normalize(src[0].double(), dim=-1) @ F.normalize(dst[0].flatten(1).T.double(), dim=-1).T  # [N, M]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    xs, ys = xs.flatten().double(), ys.flatten().double()
    out = []
    for n, cell in enumerate(index[0].tolist()):
        x0, y0, r = cell % w, cell // w, window // 2
        mask = torch.zeros(h * w, dtype=torch.bool)
        for dy in range(-r, r + 1):  # the reference's clamped window positions
            for dx in range(-r, r + 1):
                mask[min(max(y0 + dy, 0), h - 1) * w + min(max(x0 + dx, 0), w - 1)] = True
        if outside == "zero":
            weights = torch.softmax(sims[n] * mask / temperature, 0)  # outside similarities multiplied by 0
        else:
            weights = torch.softmax(sims[n].masked_fill(~mask, -math.inf) / temperature, 0)
        out.append(torch.stack([(weights * xs).sum(), (weights * ys).sum()]))
    return torch.stack(out)


@pytest.mark.parametrize("path", ["dense", "gathered"])
@pytest.mark.parametrize("outside", ["zero", "exclude"])
def test_window_soft_argmax_equals_brute_force(outside, path, monkeypatch):
    from cleandift_rt import match
    from cleandift_rt.kernels import refine

    monkeypatch.setattr(refine, "DENSE_CELLS_PER_WINDOW_CELL", 10**6 if path == "dense" else 0)
    g = torch.Generator().manual_seed(5)
    dst = torch.randn(1, 12, 7, 9, generator=g)
    src = torch.randn(1, 25, 12, generator=g) * 0.3 + dst.flatten(2).transpose(1, 2)[:, ::2][:, :25]
    index, _ = match(src, dst)
    for window, temperature in ((11, 0.02), (3, 0.1), (5, 0.5)):
        got = soft_argmax(src, dst, index, window, temperature, outside=outside)[0].double()
        want = _brute_force_soft_argmax(src, dst, index, window, temperature, outside)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        one_row_chunks = soft_argmax(src, dst, index, window, temperature, chunk_bytes=1, outside=outside)[0]
        torch.testing.assert_close(one_row_chunks.double(), got, atol=1e-6, rtol=0)
    far = torch.randn(1, 4, 12, generator=g)  # dissimilar sources: the outside zeros pull towards the centre
    idx, _ = match(far, dst)
    zero = soft_argmax(far, dst, idx, 3, 0.5, outside="zero")[0]
    torch.testing.assert_close(zero.double(), _brute_force_soft_argmax(far, dst, idx, 3, 0.5, "zero"), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="outside must be one of"):
        soft_argmax(src, dst, index, 3, 0.1, outside="ignore")


# ---------------------------------------------------------------------------------------------
# Left / right and the adaptive flip


def test_left_right_table_agrees_with_the_sides_of_every_category():
    assert set(LEFT_RIGHT_PAIRS) == set(SIDES) and len(SIDES) == 18  # SPair-71k's 18 categories
    for cat, pairs in LEFT_RIGHT_PAIRS.items():
        sides = SIDES[cat]
        paired = [i for p in pairs for i in p]
        assert len(paired) == len(set(paired)), cat  # an id has at most one partner
        assert {sides[a] + sides[b] for a, b in pairs} <= {"RL", "LR"}, cat  # always one left, one right part
        assert {i for i, s in enumerate(sides) if s != "N"} == set(paired), cat  # every sided id has its partner
        partner = mirror_partner(cat)
        assert all(partner[partner[i]] == i for i in partner), cat  # mirroring twice is the identity
    assert mirror_partner("coffee") is None


def test_permutation_maps_spair_keypoints_of_a_category_with_left_and_right_parts():
    # SPair cat ids: (0, 1) and (2, 3) are left/right pairs, 8 is on the symmetry plane
    points = np.array([[10.0, 20.0], [30.0, 22.0], [50.0, 60.0], [70.0, 80.0]])
    flipped, use = flipped_source_points(points, ["0", "1", "8", "2"], 100, "cat")  # 3 (2's partner) not annotated
    assert flipped.tolist() == [[70.0, 22.0], [90.0, 20.0], [50.0, 60.0], [30.0, 80.0]]  # x -> W - x of the partner
    assert use.tolist() == [True, True, True, False]  # 2 keeps its original prediction
    assert flipped_source_points(points, None, 100, "cat") is None  # no ids: no flip
    assert flipped_source_points(points, [0, 1, 2, 3], 100, "coffee") is None  # no table for the category
    with pytest.raises(ValueError, match="do not exist for SPair category 'cat'"):
        flipped_source_points(points, [0, 1, 2, 99], 100, "cat")


def test_flip_fit_prefers_the_mirrored_source_of_a_mirrored_pair():
    # Features of an object facing left or right: content channels plus a facing channel. The mirror
    # of a left-facing object's image has the mirrored content and faces right, like the target.
    g = torch.Generator().manual_seed(7)
    content = torch.randn(15, 6, 6, generator=g)
    facing = lambda side: torch.full((1, 6, 6), float(side))  # noqa: E731
    view = lambda c, side: F.normalize(torch.cat([c, facing(side)]), dim=0)  # noqa: E731
    target = view(content, +1)
    everything = torch.ones(6, 6, dtype=torch.bool)
    fit = lambda s: fit_distance(s, target, everything, everything)  # noqa: E731
    faces_away, its_mirror = view(content.flip(-1), -1), view(content, +1)
    assert fit(its_mirror) < fit(faces_away)  # a mirrored pair: take the flipped source
    same, its_mirror = view(content, +1), view(content.flip(-1), -1)
    assert fit(same) < fit(its_mirror)  # an identical pair: keep the source
    assert fit(same) == pytest.approx(0.0, abs=1e-3)
    # against an independent computation: mean over source cells of the minimum L2 distance
    src = F.normalize(torch.randn(16, 6, 6, generator=g), dim=0)
    want = torch.cdist(src.flatten(1).T.double(), target.flatten(1).T.double()).min(1).values.mean()
    assert fit(src) == pytest.approx(float(want), abs=1e-5)
    half = torch.zeros(6, 6, dtype=torch.bool)
    half[:, :3] = True
    want = torch.cdist(src[:, :, :3].flatten(1).T.double(), target[:, 2:, :].flatten(1).T.double()).min(1).values.mean()
    rows = torch.zeros(6, 6, dtype=torch.bool)
    rows[2:] = True
    assert fit_distance(src, target, half, rows) == pytest.approx(float(want), abs=1e-5)  # masks select the cells


def test_flip_chooses_the_mirrored_source_only_when_the_object_faces_the_other_way(engine, dino_dir, photos):
    fusion = Fusion(replace(TLFR, **{**SMALL, "sd_crop": None}), engine, Dinov2Features(dino_dir, size=112))
    cat = photos["cat"]
    mirror = cat.transpose(Image.FLIP_LEFT_RIGHT)
    points = np.array([[100.0, 100.0], [350.0, 100.0], [225.0, 200.0]])
    ids = [0, 1, 8]
    box = (40, 30, 420, 280)
    faced = fusion.transfer(cat, mirror, points, category="cat", keypoint_ids=ids, source_bbox=box, target_bbox=box)
    assert faced.flipped is True and faced.fit[1] < faced.fit[0] and faced.masks == "bbox"
    raw_cat, raw_mirror = fusion.raw([cat, mirror])  # the mirror of the cat is the mirrored photo itself
    same = fusion.transfer_raw(raw_cat, raw_cat, cat.size, cat.size, points, raw_flipped=raw_mirror, category="cat",
                               keypoint_ids=ids, source_bbox=box, target_bbox=box)
    assert same.flipped is False and same.fit[0] < same.fit[1]
    kwargs = dict(raw_flipped=raw_mirror, category="cat", keypoint_ids=ids)
    by_features = fusion.transfer_raw(raw_cat, raw_mirror, cat.size, cat.size, points, **kwargs)
    assert by_features.flipped is True and by_features.masks == "features"
    assert np.allclose(by_features.points, faced.points)  # the same extraction through both entry points
    # flipped predictions: keypoint 0 (a left/right part) now comes from its partner's mirrored position
    no_flip = replace(fusion.recipe, flip=False)
    plain = Fusion(no_flip, engine, fusion.dino).transfer_raw(raw_cat, raw_mirror, cat.size, cat.size, points)
    assert plain.flipped is None and not np.allclose(plain.points, by_features.points)
    no_ids = fusion.transfer_raw(raw_cat, raw_mirror, cat.size, cat.size, points, raw_flipped=raw_mirror, category="cat")
    assert no_ids.flipped is None and np.allclose(no_ids.points, plain.points)  # no ids: no left/right swap, no flip


# ---------------------------------------------------------------------------------------------
# The SD side


class _PoolingEngine:
    """An engine whose taps are average pools of the pixels at each tap's stride: exact and linear, so
    the crops placed and averaged must give the one-pass maps exactly."""

    taps = ("us2", "us5", "us8")
    size = (64, 64)

    def __init__(self):
        self.batches = []

    def extract(self, pixels, taps=None, prompt_embeds=None):
        from cleandift_rt.taps import TAP_TABLE

        self.batches.append(tuple(pixels.shape))
        return {t: F.avg_pool2d(pixels, TAP_TABLE[t].stride).repeat(1, 2, 1, 1) for t in taps}


def test_crops_are_placed_and_averaged_on_the_canvas_grid(photos):
    canvas, _ = square_canvas([photos["coffee"]], 192)
    fake = _PoolingEngine()
    crops = SdTaps(fake, size=192, crop=128).canvas_taps(canvas)[0]
    whole = SdTaps(fake, size=192, crop=None).canvas_taps(canvas)[0]
    assert fake.batches == [(4, 3, 128, 128), (1, 3, 192, 192)]  # 2 x 2 crops in one batch, then one pass
    for tap, side in (("us8", 12), ("us5", 6), ("us2", 3)):
        assert crops[tap].shape == (6, side, side)
        torch.testing.assert_close(crops[tap], whole[tap], atol=1e-6, rtol=0)

    class NoTaps(_PoolingEngine):
        taps = ("us6",)

    with pytest.raises(ValueError, match="re-export with --taps us2 us5 us8"):
        SdTaps(NoTaps())
    with pytest.raises(ValueError, match="multiple of 64"):
        SdTaps(fake, size=960, crop=500)


def test_canvas_placement_round_trips():
    p = placement(500, 375, 840)
    assert (p.content_width, p.content_height, p.offset_x, p.offset_y) == (840, 630, 0, 105)
    pts = np.array([[0.0, 0.0], [499.0, 374.0], [123.4, 56.7]])
    assert np.allclose(p.from_canvas(p.to_canvas(pts)), pts)
    assert np.allclose(p.to_canvas(pts)[1], [499 * 840 / 500, 374 * 840 / 500 + 105])


# ---------------------------------------------------------------------------------------------
# eval-spair and match with a recipe


def _cached_raw(cache_dir, path, category, flipped):
    """The raw maps the run cached for an image (SD part and DINO part are two folders)."""
    from safetensors.torch import load_file

    from cleandift_rt.checkpoint import file_identity, short_hash

    key = short_hash(file_identity(path), category) + ("-flip" if flipped else "")
    maps = {}
    for folder in (cache_dir / "fusion").iterdir():
        maps.update(load_file(str(folder / f"{key}.safetensors")))
    return maps


def _independent_tlfr(raw_src, raw_trg, raw_flip, pair, src_size, trg_size, grid=8, canvas=112):
    """tlfr from raw maps, written out: descriptors, cells, brute-force window soft-argmax, flip by boxes."""
    def desc(raw):
        sd = torch.cat([F.interpolate(raw[t][None].double(), size=(grid, grid), mode="bilinear", align_corners=False)[0]
                        for t in ("us8", "us5", "us2")])
        both = torch.cat([sd / sd.norm(dim=0), raw["dino"].double() / raw["dino"].double().norm(dim=0)])
        return both / both.norm(dim=0)

    def place(size):
        w, h = size
        s = canvas / max(w, h)
        cw, ch = (canvas, round(canvas * h / w)) if w >= h else (round(canvas * w / h), canvas)
        return s, (canvas - cw) // 2, (canvas - ch) // 2

    def predict(d_src, d_trg, pts):
        s, ox, oy = place(src_size)
        cells = np.clip(np.floor((pts * s + [ox, oy]) * grid / canvas), 0, grid - 1).astype(int)
        rows = d_src[:, cells[:, 1], cells[:, 0]].T[None].float()
        from cleandift_rt import match

        index, _ = match(rows, d_trg[None].float())
        xy = _brute_force_soft_argmax(rows, d_trg[None].float(), index, 11, 0.02, "zero").numpy()
        s, ox, oy = place(trg_size)
        return ((xy + 0.5) * canvas / grid - [ox, oy]) / s

    def box_cells(box, size):
        s, ox, oy = place(size)
        centres = (np.arange(grid) + 0.5) * canvas / grid
        x1, y1, x2, y2 = box
        inside_x = (centres >= x1 * s + ox) & (centres <= x2 * s + ox)
        inside_y = (centres >= y1 * s + oy) & (centres <= y2 * s + oy)
        return torch.from_numpy(inside_y[:, None] & inside_x[None, :]).flatten()

    def fit(d_src, m_src, d_trg, m_trg):
        return torch.cdist(d_src.flatten(1).T[m_src], d_trg.flatten(1).T[m_trg]).min(1).values.mean()

    d_src, d_trg, d_flip = desc(raw_src), desc(raw_trg), desc(raw_flip)
    pred = predict(d_src, d_trg, pair.source_points)
    partner = {i: i for i in range(len(SIDES[pair.category]))} if pair.category in SIDES else None
    if partner is None or pair.keypoint_ids is None:
        return pred
    for a, b in LEFT_RIGHT_PAIRS[pair.category]:
        partner[a], partner[b] = b, a
    ids = list(pair.keypoint_ids)
    w = src_size[0]
    flip_pts = np.array([[w - pair.source_points[ids.index(partner[i]) if partner[i] in ids else r][0],
                          pair.source_points[ids.index(partner[i]) if partner[i] in ids else r][1]] for r, i in enumerate(ids)])
    x1, y1, x2, y2 = pair.source_bbox
    m_trg = box_cells(pair.target_bbox, trg_size)
    if fit(d_flip, box_cells((w - x2, y1, w - x1, y2), src_size), d_trg, m_trg) < fit(d_src, box_cells(pair.source_bbox, src_size), d_trg, m_trg):
        use = np.array([partner[i] in ids for i in ids])
        pred = np.where(use[:, None], predict(d_flip, d_trg, flip_pts), pred)
    return pred


def test_eval_spair_tlfr_equals_an_independent_recomputation(spair, engine_args, dino_dir, tmp_path, capsys):
    from cleandift_rt.cli.main import main
    from cleandift_rt.evaluation import load_spair

    out = tmp_path / "tlfr.json"
    args = ["eval-spair", "--root", str(spair["root"]), *engine_args, "--out", str(out), "--recipe", "tlfr",
            "--dino", str(dino_dir), "--dino-size", "112", "--sd-size", "128", "--sd-crop", "64", "--threshold", "tlfr",
            "--categories", "cat", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tlfr" in text and "adaptive flip:" in text
    doc = json.loads(out.read_text())
    assert doc["method"]["method"] == "tlfr" and doc["method"]["prompt"] == "A photo of a {category}"
    assert doc["counts"]["pairs"] == 4 and doc["counts"]["skipped"]["pairs"]["image cannot be decoded"] == 1
    flips = doc["method"]["flip_decisions"]
    assert sum(flips.values()) == 4 and flips["not applicable"] == 1  # the pair without kps_ids

    pairs = {p.pair_id: p for p in load_spair(spair["root"])[0]}
    journal = next((tmp_path / "tlfr.cache").glob("journal-*.jsonl")).read_text().splitlines()[1:]
    records = {r["pair_id"]: r for r in map(json.loads, journal) if "result" in r}
    assert len(records) == 4
    per_pair = {a: [] for a in (0.05, 0.1, 0.15)}
    pooled = {a: [] for a in per_pair}
    for pid, rec in records.items():
        p = pairs[pid]
        src_size, trg_size = Image.open(p.source).size, Image.open(p.target).size
        keep = ((p.source_points >= 0) & (p.source_points < src_size)).all(1) & \
            ((p.target_points >= 0) & (p.target_points < trg_size)).all(1)
        p = replace(p, source_points=p.source_points[keep], target_points=p.target_points[keep],
                    keypoint_ids=None if p.keypoint_ids is None else [i for i, k in zip(p.keypoint_ids, keep) if k])
        raws = [_cached_raw(tmp_path / "tlfr.cache", p.source, p.category, False),
                _cached_raw(tmp_path / "tlfr.cache", p.target, p.category, False),
                _cached_raw(tmp_path / "tlfr.cache", p.source, p.category, True)]
        pred = _independent_tlfr(*raws, p, src_size, trg_size)
        assert np.allclose(rec["result"]["predictions"], pred, atol=1e-2), pid
        err = np.linalg.norm(pred - p.target_points, axis=1)
        x1, y1, x2, y2 = p.target_bbox
        for a in per_pair:
            ok = err < a * max(x2 - x1, y2 - y1)  # --threshold tlfr: strictly below
            pooled[a].append(ok)
            per_pair[a].append(ok.mean())
    for a in per_pair:
        cell = doc["pck"]["bbox"][str(a)]
        assert cell["point"] == pytest.approx(100 * np.concatenate(pooled[a]).mean(), abs=1e-9)
        assert cell["image"] == pytest.approx(100 * np.mean(per_pair[a]), abs=1e-9)

    assert main(args) == 0  # resumes from the journal, from cached maps
    # the 4 scored pairs resume; the 3 skipped ones are checked again (issue 29), extracting nothing
    assert "0 images extracted, 0 from cache, 4 pairs resumed" in capsys.readouterr().out
    assert json.loads(out.read_text())["pck"] == doc["pck"]


def test_recipes_side_by_side_with_ablations_and_clear_errors(spair, engine_args, dino_dir, tmp_path, capsys):
    import csv

    from cleandift_rt.cli.main import main

    out = tmp_path / "side.json"
    common = ["eval-spair", "--root", str(spair["root"]), *engine_args, "--categories", "coffee", "--sd-size", "128",
              "--sd-crop", "0", "--dino-size", "112", "--no-progress"]
    assert main([*common, "--out", str(out), "--recipe", "nn", "tale", "tlfr", "--no-dino", "--no-flip"]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    names = [b["method"]["method"] for b in doc["methods"]]
    assert names == ["cleandift", "tale-nodino", "tlfr-noflip-nodino"]  # what was switched off is in the name
    assert doc["method"]["method"] == "cleandift" and doc["protocol"]["recipes"] == ["nn", "tale", "tlfr"]
    assert doc["methods"][2]["method"]["refine"] is True and doc["methods"][2]["method"]["sd"]["passes"] == "one pass"
    assert "note: the engine runs at 64x64" in text  # the one-pass canvas is 128 px
    header = next(line for line in text.splitlines() if line.startswith("kind  alpha"))
    assert all(n in header for n in names)  # one column per method
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert {r["method"] for r in rows} == set(names) and len(rows) == 3 * (1 + 1 + 1) * 2 * 3 * 2
    assert main([*common, "--out", str(out), "--recipe", "tlfr"]) == 2  # DINO on but no weights given
    assert "--dino PATH" in capsys.readouterr().err
    assert main([*common, "--out", str(out), "--recipe", "tlfr", "--dino", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*common, "--out", str(out), "--recipe", "tlfr", "--no-dino", "--sd-size", "100"]) == 2
    assert "must be multiples of 64" in capsys.readouterr().err


def test_match_with_tlfr_flips_a_mirrored_pair(engine_args, dino_dir, photos, tmp_path, capsys):
    from cleandift_rt.cli.main import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    photos["cat"].save(a)
    photos["cat"].transpose(Image.FLIP_LEFT_RIGHT).save(b)
    args = ["match", str(a), str(b), *engine_args, "--recipe", "tlfr", "--dino", str(dino_dir), "--dino-size", "112",
            "--sd-size", "128", "--sd-crop", "0", "--out", str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json")]
    assert main(args) == 0
    assert "image A mirrored" in capsys.readouterr().out
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["flipped"] is True and doc["recipe"]["method"] == "tlfr" and len(doc["matches"]) > 0
    assert all(0 <= m["a"][0] < 451 and 0 <= m["b"][1] < 300 for m in doc["matches"])
    assert Image.open(tmp_path / "m.png").size[0] > 451
    assert main([*args[:-4], "--out", str(tmp_path / "k.png"), "--points", "100,100 300,120"]) == 0
    assert "no adaptive flip for --points" in capsys.readouterr().out
