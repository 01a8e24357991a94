"""The tap table and capture: names, channels, shapes, hook equality, pruning."""

from __future__ import annotations

import pytest
import torch

from cleandift_rt import TAP_TABLE, TAPS, unet_taps
from cleandift_rt.models.configs import unet_config
from cleandift_rt.models import build_models
from cleandift_rt.taps import resolve_taps, tap_channels, tap_shape

METHOD_TABLE = [  # docs/method.md, taps, written out independently of taps.py
    ("mid", "mid_block", 1280, 64), ("us1", "up_blocks.0.resnets.0", 1280, 64),
    ("us2", "up_blocks.0.resnets.1", 1280, 64), ("us3", "up_blocks.0.upsamplers.0", 1280, 32),
    ("us4", "up_blocks.1.attentions.0", 1280, 32), ("us5", "up_blocks.1.attentions.1", 1280, 32),
    ("us6", "up_blocks.1.upsamplers.0", 1280, 16), ("us7", "up_blocks.2.attentions.0", 640, 16),
    ("us8", "up_blocks.2.attentions.1", 640, 16), ("us9", "up_blocks.2.upsamplers.0", 640, 8),
    ("us10", "up_blocks.3.attentions.0", 320, 8),
]


def test_table_matches_spec():
    assert TAPS == tuple(row[0] for row in METHOD_TABLE)
    sd = tap_channels(unet_config("sd21")["block_out_channels"])
    for name, module, channels, stride in METHOD_TABLE:
        assert TAP_TABLE[name].module == module
        assert sd[name] == channels
        assert TAP_TABLE[name].stride == stride
    assert tap_shape("us6", [320, 640, 1280, 1280], 768, 768) == (1280, 48, 48)
    assert tap_shape("us10", [320, 640, 1280, 1280], 512, 512) == (320, 64, 64)


def test_resolve_taps_orders_and_rejects():
    assert resolve_taps(["us8", "mid"]) == ("mid", "us8")
    assert resolve_taps("us6") == ("us6",)
    with pytest.raises(ValueError, match="unknown tap.*us11"):
        resolve_taps(["us11"])
    with pytest.raises(ValueError, match="empty tap selection"):
        resolve_taps([])


@pytest.fixture(scope="module", params=["tiny", "tiny-sd15"])
def unet(request):
    return build_models(request.param, seed=3)[0].eval()


def _inputs(unet, h, w, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, h // 8, w // 8, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, ctx


def _hooked_full_forward(unet, sample, t, ctx):
    """Independent reference: plain forward hooks on the modules of docs/method.md, full forward."""
    out, handles = {}, []
    for name, module, _, _ in METHOD_TABLE:
        def hook(_m, _i, o, name=name):
            out[name] = o if isinstance(o, torch.Tensor) else o[0]
        handles.append(unet.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("h,w", [(128, 128), (192, 128)])
def test_shapes_and_bit_exact_hooks(unet, h, w):
    sample, ctx = _inputs(unet, h, w)
    with torch.no_grad():
        feats = unet_taps(unet, sample, 261, ctx)
    ref = _hooked_full_forward(unet, sample, 261, ctx)
    channels = tap_channels(unet.config.block_out_channels)
    assert list(feats) == list(TAPS)
    for name in TAPS:
        stride = TAP_TABLE[name].stride
        assert feats[name].shape == (2, channels[name], h // stride, w // stride)
        assert torch.equal(feats[name], ref[name]), name


def test_pruned_forward_stops_and_matches(unet):
    sample, ctx = _inputs(unet, 128, 128, batch=1)
    ran = []
    watched = {"up_blocks.1": unet.up_blocks[1], "up_blocks.2": unet.up_blocks[2], "conv_out": unet.conv_out}
    handles = [m.register_forward_hook(lambda *_a, n=n: ran.append(n)) for n, m in watched.items()]
    try:
        with torch.no_grad():
            pruned = unet_taps(unet, sample, 100, ctx, taps=["us2", "us5"])
    finally:
        for hd in handles:
            hd.remove()
    assert list(pruned) == ["us2", "us5"]
    assert ran == []  # up_blocks[1] never *finished*, later blocks never ran
    full = _hooked_full_forward(unet, sample, 100, ctx)
    for name, value in pruned.items():
        assert torch.equal(value, full[name])


def test_capture_leaves_no_hooks(unet):
    sample, ctx = _inputs(unet, 128, 128, batch=1)
    with torch.no_grad():
        unet_taps(unet, sample, 5, ctx, taps=["mid"])
    assert all(not m._forward_hooks for m in unet.modules())


def test_unknown_tap_and_wrong_topology():
    unet = build_models("tiny", seed=0)[0]
    sample, ctx = _inputs(unet, 128, 128, batch=1)
    with pytest.raises(ValueError, match="unknown tap"):
        unet_taps(unet, sample, 1, ctx, taps=["us42"])
    del unet.up_blocks[3]
    with pytest.raises(ValueError, match="no module 'up_blocks.3.attentions.0'"):
        unet_taps(unet, sample, 1, ctx)
