"""The native bf16 CPU kernels of match and project (AMX tdpbf16ps where the CPU has it, else
AVX512_BF16 vdpbf16ps; the AMX kernel's emulation: test_amx.py): exact agreement with
references that round the same way, bounded agreement with fp32, dispatch and the fallback.

References are tie-exact (tests/match_reference.py): each distinct (source, target) vector pair is
scored once in float64 and broadcast, so duplicated vectors tie exactly, as they do in the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from match_reference import (accumulation_tol, bf16_bound, check_against, exact_unit, ranked, rounded_unit,
                             tie_exact_similarity, with_duplicates)

from cleandift_rt import build_info, match, project
from cleandift_rt.kernels import precision as precision_rules
from cleandift_rt.models.heads import ProjectionHeads

needs_bf16 = pytest.mark.skipif(not precision_rules.native_bf16(),
                                reason="no AVX512_BF16 on this CPU: the bf16 kernels cannot run here")
@needs_bf16
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), n=st.integers(1, 40), m=st.integers(1, 60), c=st.integers(1, 70),
       k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_bf16_matches_its_rounded_reference_exactly(b, n, m, c, k, seed):
    """Exact wherever the reference's gaps exceed the fp32 accumulation error, ties to the lowest index."""
    k = min(k, m)
    gen = torch.Generator().manual_seed(seed)
    src = with_duplicates(torch.randn(b, n, c, generator=gen), gen)
    dst = with_duplicates(torch.randn(b, m, c, generator=gen), gen)
    index, sim = match(src, dst, k=k, precision="bf16")
    check_against(src, dst, index, sim, rounded_unit, 2 * accumulation_tol(c), k=k, min_settled=0.0)
    # and within the bf16 bound of the exact cosine, exact where the exact gap exceeds twice the bound
    check_against(src, dst, index, sim, exact_unit, 2 * bf16_bound(c), k=k, exact_ties=False, min_settled=0.0)


@needs_bf16
@pytest.mark.parametrize("c", [256, 640, 1280])
def test_bf16_agrees_with_fp32_brute_force(c):
    """>= 99% of rows on random data, exactly where the top-2 gap exceeds twice the bf16 bound.

    Not flaky: the data is seeded and the kernel deterministic; at these sizes about 0.5% of rows
    have gaps within the bf16 error (5000 rows, so 99% is several standard deviations away)."""
    gen = torch.Generator().manual_seed(c)
    src, dst = torch.randn(2, 2500, c, generator=gen), torch.randn(2, 500, c, generator=gen)
    index, sim = match(src, dst, precision="bf16")
    ref = tie_exact_similarity(src, dst, exact_unit)
    order, vals = ranked(ref)
    agree = (index == order[..., 0]).double().mean().item()
    assert agree >= 0.99, f"bf16 agrees with fp32 on {agree:.4f} of rows"
    assert agree < 1.0, "bf16 ran as exactly as fp32: is the bf16 kernel in use?"
    bound = bf16_bound(c)
    assert (sim.double() - vals[..., 0]).abs().max() <= bound
    clear = (vals[..., 0] - vals[..., 1]) > 2 * bound
    assert clear.any() and torch.equal(index[clear], order[..., 0][clear])


@needs_bf16
def test_bf16_mutual_layouts_and_numpy():
    gen = torch.Generator().manual_seed(7)
    src_map, dst_map = torch.randn(2, 48, 6, 7, generator=gen), torch.randn(2, 48, 5, 8, generator=gen)
    rows = lambda x: x.flatten(2).transpose(1, 2).contiguous()  # noqa: E731
    index, sim = match(rows(src_map), rows(dst_map), mutual=True, precision="bf16")
    ref = tie_exact_similarity(rows(src_map), rows(dst_map), rounded_unit)
    for dim in (-1, -2):  # random data of this size has no near-ties in either direction
        assert (ref.topk(2, dim=dim).values.diff(dim=dim).abs() > 2 * accumulation_tol(48)).all()
    fwd, bwd = ref.argmax(-1), ref.argmax(-2)
    expected = torch.where(torch.gather(bwd, 1, fwd) == torch.arange(fwd.shape[1]), fwd, -1)
    assert torch.equal(index, expected)
    map_index, map_sim = match(src_map, dst_map, mutual=True, precision="bf16")  # strided [B, C, h, w] reads
    assert torch.equal(map_index, index) and torch.allclose(map_sim, sim, atol=1e-6, rtol=0)
    np_index, np_sim = match(rows(src_map).numpy(), rows(dst_map).numpy(), mutual=True, precision="bf16")
    assert np.array_equal(np_index, index.numpy()) and np.array_equal(np_sim, sim.numpy())


@needs_bf16
def test_dispatch_follows_inputs_and_precision():
    gen = torch.Generator().manual_seed(9)
    src, dst = torch.randn(1, 300, 64, generator=gen), torch.randn(1, 400, 64, generator=gen)
    fp32 = match(src, dst)
    bf16 = match(src, dst, precision="bf16")
    from_bf16_inputs = match(src.bfloat16(), dst.bfloat16())  # bf16 inputs: bf16 products by default
    rounded_first = match(src.bfloat16(), dst.bfloat16(), precision="bf16")
    upcast = match(src.bfloat16(), dst.bfloat16(), precision="fp32")
    assert torch.equal(from_bf16_inputs[1], rounded_first[1])
    assert not torch.equal(bf16[1], fp32[1]) and (bf16[1] - fp32[1]).abs().max() < bf16_bound(64)
    assert not torch.equal(from_bf16_inputs[1], upcast[1])
    assert torch.equal(upcast[0], match(src.bfloat16().float(), dst.bfloat16().float())[0])
    assert build_info()["cpu_kernel_bf16"] == ("amx" if "amx_bf16" in build_info()["simd"] else "avx512_bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        match(src, dst, precision="fp16")


def make_heads(dim: int, seed: int = 0) -> ProjectionHeads:
    torch.manual_seed(seed)
    heads = ProjectionHeads({"us6": dim})
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return heads.eval()


def bf16_head_reference(heads: ProjectionHeads, x: torch.Tensor, t) -> torch.Tensor:
    """The head with the kernel's roundings: weights and both GEMMs' inputs to bf16, the rest in float64."""
    bf = lambda w: w.detach().float().bfloat16().double()  # noqa: E731
    b, d, h, w = x.shape
    with torch.no_grad():
        cond = heads.cond(t, batch=b).float()
        xs = x.flatten(2).transpose(1, 2).double()
        for layer in heads.adapters["us6"].layers:
            scale = (1 + cond @ layer.norm.linear.weight.float().T).double()[:, None, :]
            rinv = 1 / (xs.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            y = bf(xs * rinv * scale) @ bf(layer.up_proj.weight).T
            value, gate = y[..., :d], y[..., d:]
            xs = xs + bf(value * F.silu(gate)) @ bf(layer.down_proj.weight).T
    return xs.transpose(1, 2).reshape(b, d, h, w)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@needs_bf16
@pytest.mark.parametrize("dim,shape", [(64, (2, 5, 7)), (33, (1, 3, 3)), (320, (1, 13, 11))])
def test_project_bf16_against_its_rounded_reference_and_fp32(dim, shape):
    """D = 33: depth padded to channel pairs; D = 320: more than one 256-deep weight slice; pixel
    counts that leave partial register tiles."""
    heads = make_heads(dim, seed=dim)
    b, h, w = shape
    x = torch.randn(b, dim, h, w, generator=torch.Generator().manual_seed(dim)) * 2
    out = project(x, 261, heads, "us6", precision="bf16")
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        ref32 = heads("us6", x, 261)
    emulated = bf16_head_reference(heads, x, 261)
    # The kernel sums in fp32, the reference in float64, so now and then (about once in 2e4 values)
    # a value right at a bf16 rounding midpoint rounds the other way and moves its pixel by up to
    # ~1e-3: most pixels match to fp32 accuracy, and the mean error is far below bf16's.
    scale = emulated.abs().max()
    per_pixel = (out.double() - emulated).abs().amax(1).flatten() / scale
    assert per_pixel.median() < 1e-5, per_pixel.median()
    mean_vs_emulated = (out.double() - emulated).abs().mean()
    mean_vs_fp32 = (out.double() - ref32.double()).abs().mean()
    assert mean_vs_emulated < 0.1 * mean_vs_fp32, (mean_vs_emulated, mean_vs_fp32)  # bf16 really ran
    assert rel_error(out, ref32) < 2e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = heads("us6", x, 261)
    assert rel_error(out, autocast) < 2e-2


@needs_bf16
def test_project_bf16_features_default_to_bf16_and_caches_are_per_precision():
    heads = make_heads(48, seed=5)
    x = torch.randn(2, 48, 4, 6)
    fp32 = project(x, 261, heads, "us6")
    bf16 = project(x, 261, heads, "us6", precision="bf16")
    again = project(x, 261, heads, "us6")  # the bf16 packing did not replace the fp32 one
    assert torch.equal(again, fp32) and not torch.equal(bf16, fp32)
    xb = x.bfloat16()
    out = project(xb, 261, heads, "us6")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, project(xb.float(), 261, heads, "us6", precision="bf16").bfloat16())
    assert not torch.equal(out, project(xb, 261, heads, "us6", precision="fp32"))
    with pytest.raises(ValueError, match="precision must be one of"):
        project(x, 261, heads, "us6", precision="half")


def test_without_native_bf16_the_kernels_warn_once_and_run_fp32():
    """CLEANDIFT_DISABLE_SIMD hides AVX512_BF16 and AMX from the native module, as on a CPU without them."""
    code = (
        "import json, warnings, torch, cleandift_rt\n"
        "from cleandift_rt.build_info import native\n"
        "from cleandift_rt.models.heads import ProjectionHeads\n"
        "warnings.simplefilter('always')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "s, d = torch.randn(1, 50, 40, generator=g), torch.randn(1, 60, 40, generator=g)\n"
        "heads = ProjectionHeads({'us6': 40}); x = torch.randn(1, 40, 3, 3, generator=g)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    m = cleandift_rt.match(s, d, precision='bf16'); p = cleandift_rt.project(x, 261, heads, 'us6', precision='bf16')\n"
        "    default = cleandift_rt.match(s.bfloat16(), d.bfloat16())\n"
        "f = cleandift_rt.match(s, d)\n"
        "try:\n"
        "    native().match_cpu(s.numpy(), d.numpy(), 'float32', False, 1, True, 'bfloat16'); refused = ''\n"
        "except ValueError as exc:\n"
        "    refused = str(exc)\n"
        "up = cleandift_rt.match(s.bfloat16().float(), d.bfloat16().float())\n"
        "print(json.dumps({'simd': cleandift_rt.build_info()['simd'], 'kernel': cleandift_rt.build_info()['cpu_kernel_bf16'],\n"
        "    'warnings': [str(w.message) for w in caught], 'same': torch.equal(m[1], f[1]),\n"
        "    'project_same': torch.equal(p, cleandift_rt.project(x, 261, heads, 'us6')),\n"
        "    'default_upcast': torch.equal(default[1], up[1]), 'refused': refused}))\n"
    )
    env = dict(os.environ, CLEANDIFT_DISABLE_SIMD="avx512_bf16,amx")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "avx512_bf16" not in got["simd"] and got["kernel"] is None
    assert len(got["warnings"]) == 1 and "no native bf16" in got["warnings"][0]
    assert got["same"] and got["project_same"] and got["default_upcast"]
    assert "needs AVX512_BF16" in got["refused"]
