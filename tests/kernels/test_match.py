"""cleandift_rt.match against brute-force PyTorch (normalize + matmul + argmax / topk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from match_reference import brute_mutual, brute_similarity, check_rows, pooled, ranked, unambiguous

import cleandift_rt
from cleandift_rt import match
from cleandift_rt.kernels.matching import sample_points


@pytest.mark.parametrize("b,n,m,c", [(1, 1, 1, 1), (1, 1, 7, 3), (2, 7, 1, 5), (2, 37, 53, 19),
                                     (1, 100, 333, 33), (3, 129, 200, 320), (1, 13, 41, 4099)])
def test_random_against_brute_force(b, n, m, c):
    gen = torch.Generator().manual_seed(b * 1000 + n + m + c)
    src, dst = torch.randn(b, n, c, generator=gen), torch.randn(b, m, c, generator=gen)
    index, sim = match(src, dst)
    assert index.dtype == torch.int64 and sim.dtype == torch.float32
    assert index.shape == sim.shape == (b, n)
    check_rows(brute_similarity(src, dst), index[..., None], sim[..., None])


@pytest.mark.parametrize("k", [2, 5, 17])
def test_topk_against_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    src, dst = torch.randn(2, 45, 24, generator=gen), torch.randn(2, 70, 24, generator=gen)
    index, sim = match(src, dst, k=k)
    assert index.shape == sim.shape == (2, 45, k)
    check_rows(brute_similarity(src, dst), index, sim, k=k)
    assert torch.all(sim[..., :-1] >= sim[..., 1:])


def test_topk_equal_to_m_returns_every_target():
    src, dst = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    index, _ = match(src, dst, k=6)
    assert torch.equal(index.sort(-1).values, torch.arange(6).expand(1, 4, 6))


@pytest.mark.parametrize("n,m,c", [(50, 60, 16), (300, 130, 77), (1, 40, 5), (40, 1, 5)])
def test_mutual_is_two_brute_force_argmaxes(n, m, c):
    gen = torch.Generator().manual_seed(n + m)
    src, dst = torch.randn(2, n, c, generator=gen), torch.randn(2, m, c, generator=gen)
    index, sim = match(src, dst, mutual=True)
    expected, safe = brute_mutual(brute_similarity(src, dst))
    assert torch.equal(index[safe], expected[safe])
    fwd_index, fwd_sim = match(src, dst)
    assert torch.equal(sim, fwd_sim)  # the similarity stays the forward best
    assert torch.equal(index[index >= 0], fwd_index[index >= 0])


def test_ties_lowest_index_wins():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 37, generator=gen)
    # every target appears three times (positions j, j + 5, j + 10) and at 70 + j far away
    dst = torch.cat([base, base, base, torch.randn(55, 37, generator=gen), base])[None]
    src = base[None] * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])[None, :, None]
    index, sim = match(src, dst)
    assert torch.equal(index, torch.arange(5)[None])
    torch.testing.assert_close(sim, torch.ones(1, 5), atol=1e-6, rtol=0)
    index, _ = match(src, dst, k=3)
    assert torch.equal(index[0], torch.stack([torch.arange(5), torch.arange(5) + 5, torch.arange(5) + 10], -1))
    # all-equal targets: index 0 everywhere, also across SIMD panels and column chunks
    same = torch.randn(1, 1, 19).expand(1, 1000, 19).contiguous()
    index, _ = match(torch.randn(1, 64, 19), same)
    assert torch.all(index == 0)


def test_mutual_ties_lowest_source_wins():
    dst = torch.eye(4)[None]
    src = torch.eye(4)[[2, 0, 2, 1]][None]   # sources 0 and 2 are the same vector
    index, _ = match(src, dst, mutual=True)
    assert index.tolist() == [[2, 0, -1, 1]]


def test_zero_vectors():
    src = torch.randn(1, 4, 10)
    src[0, 2] = 0
    dst = -torch.rand(1, 6, 10) - 0.1        # every real similarity with dst[...] of a positive src is < 0
    dst[0, 3] = 0
    index, sim = match(src.abs(), dst)
    assert index.tolist() == [[3, 3, 0, 3]] and torch.all(sim == 0)  # the zero target (similarity 0) wins
    assert match(src, dst)[0][0, 2] == 0                             # zero source: similarity 0, target 0


def test_nonfinite_rejected_or_matched_with_flag():
    src, dst = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    src[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"src contains NaN or Inf \(first at batch 1, vector 3, channel 4\)"):
        match(src, dst)
    bad_dst = dst.clone()
    bad_dst[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="dst contains NaN or Inf.*allow_nonfinite"):
        match(src.nan_to_num(), bad_dst)
    index, sim = match(src, dst, allow_nonfinite=True)
    assert index[1, 3] == -1 and torch.isnan(sim[1, 3])
    clean = torch.ones(2, 5, dtype=torch.bool)
    clean[1, 3] = False
    ref_index, ref_sim = match(src.nan_to_num(), dst)
    assert torch.equal(index[clean], ref_index[clean]) and torch.equal(sim[clean], ref_sim[clean])


@pytest.mark.parametrize("src,dst,error,pattern", [
    (torch.zeros(0, 4, 8), torch.zeros(0, 4, 8), ValueError, "empty batch"),
    (torch.zeros(1, 0, 8), torch.zeros(1, 4, 8), ValueError, "no vectors"),
    (torch.zeros(4, 8), torch.zeros(4, 8), ValueError, r"\[B, N, C\] or \[B, C, h, w\]"),
    (torch.zeros(1, 4, 8), torch.zeros(1, 4, 9), ValueError, "channels"),
    (torch.zeros(2, 4, 8), torch.zeros(1, 4, 8), ValueError, "batch"),
    (torch.zeros(1, 4, 8, dtype=torch.int64), torch.zeros(1, 4, 8), TypeError, "float32"),
    (torch.zeros(1, 4, 8, dtype=torch.float64), torch.zeros(1, 4, 8), TypeError, r"\.float\(\)"),
    (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8, dtype=torch.float16), TypeError, "convert one"),
    (np.zeros((1, 4, 8)), np.zeros((1, 4, 8)), TypeError, "astype"),
    ([[[1.0]]], [[[1.0]]], TypeError, "torch.Tensor or numpy.ndarray"),
])
def test_bad_inputs_rejected_clearly(src, dst, error, pattern):
    with pytest.raises(error, match=pattern):
        match(src, dst)


def test_bad_options_rejected_clearly():
    src, dst = torch.randn(1, 4, 8), torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="k = 6 exceeds the 5 target"):
        match(src, dst, k=6)
    with pytest.raises(ValueError, match="k = 1000000000000 exceeds the 5 target"):
        match(src, dst, k=10**12)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        match(src, dst, k=0)
    with pytest.raises(ValueError, match="mutual=True is defined for k = 1"):
        match(src, dst, mutual=True, k=2)
    with pytest.raises(ValueError, match="coords"):
        match(src, dst, coords="pixels")
    with pytest.raises(ValueError, match="needs dst as"):
        match(src, dst, coords="feature")


def test_numpy_in_numpy_out_and_fp16():
    gen = np.random.default_rng(0)
    src, dst = gen.standard_normal((2, 30, 12), dtype=np.float32), gen.standard_normal((2, 40, 12), dtype=np.float32)
    src.setflags(write=False)                       # read-only inputs (memory maps) are read in place, quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index, sim = match(src, dst)
    assert isinstance(index, np.ndarray) and index.dtype == np.int64 and sim.dtype == np.float32
    t_index, t_sim = match(torch.from_numpy(src.copy()), torch.from_numpy(dst))
    assert np.array_equal(index, t_index.numpy()) and np.array_equal(sim, t_sim.numpy())
    index, sim = match(src.astype(np.float16), dst.astype(np.float16))
    ref = brute_similarity(torch.from_numpy(src.astype(np.float16)), torch.from_numpy(dst.astype(np.float16)))
    check_rows(ref, torch.from_numpy(index)[..., None], torch.from_numpy(sim)[..., None])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast_exactly(dtype):
    gen = torch.Generator().manual_seed(3)
    src, dst = torch.randn(2, 33, 40, generator=gen).to(dtype), torch.randn(2, 50, 40, generator=gen).to(dtype)
    index, sim = match(src, dst, precision="fp32")  # bf16 inputs default to bf16 products where native (test_bf16)
    check_rows(brute_similarity(src.float(), dst.float()), index[..., None], sim[..., None])
    f_index, f_sim = match(src.float(), dst.float())
    assert torch.equal(index, f_index) and torch.equal(sim, f_sim)


def test_feature_map_layout_and_strides():
    gen = torch.Generator().manual_seed(1)
    src_map, dst_map = torch.randn(2, 24, 5, 7, generator=gen), torch.randn(2, 24, 6, 4, generator=gen)
    rows = lambda x: x.flatten(2).transpose(1, 2).contiguous()  # noqa: E731
    expected = match(rows(src_map), rows(dst_map), k=3)
    for s, d in [(src_map, dst_map), (rows(src_map), dst_map),
                 (src_map.transpose(2, 3).contiguous().transpose(2, 3), dst_map),  # channels-last-ish strides
                 (src_map.to(memory_format=torch.channels_last), dst_map.to(memory_format=torch.channels_last))]:
        got = match(s, d, k=3)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # sliced (non-contiguous) views are read in place and agree with their copies
    big = torch.randn(3, 50, 48, generator=gen)
    view_src, view_dst = big[::2, ::3, ::2], big[1:2, 1::2, 1::2].expand(2, -1, -1)
    got = match(view_src, view_dst)
    ref = match(view_src.contiguous(), view_dst.contiguous())
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_coordinates_points_and_refinement():
    gen = torch.Generator().manual_seed(2)
    dst = torch.randn(1, 16, 6, 8, generator=gen)
    src = dst[..., 1:5, 2:7].clone()                       # source pixel (x, y) is target (x + 2, y + 1)
    xy, sim = match(src, dst, coords="feature")
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    expected = torch.stack([xs + 2, ys + 1], -1).reshape(1, 20, 2).float()
    assert torch.equal(xy, expected)
    torch.testing.assert_close(sim, torch.ones(1, 20), atol=1e-6, rtol=0)
    img, _ = match(src, dst, coords="image", image_size=(48, 64))  # 8x: centres (x + 0.5) * 8 - 0.5
    torch.testing.assert_close(img, (expected + 0.5) * 8 - 0.5)
    # source and target images of different sizes: points in source pixels, result in target pixels
    src_img_pts = (torch.tensor([[[4.0, 3.0]]]) + 0.5) * 4 - 0.5           # source image 4x its map
    img, _ = match(src, dst, points=src_img_pts, coords="image", image_size=((16, 20), (48, 64)))
    torch.testing.assert_close(img, (torch.tensor([[[6.0, 4.0]]]) + 0.5) * 8 - 0.5)
    for bad in [None, (48,), ((48, 64), (48,)), (48, -64)]:
        with pytest.raises(ValueError, match=r"image_size=\(H, W\)"):
            match(src, dst, coords="image", image_size=bad)
    # integer query points sample exactly the source vectors; sub-pixel points interpolate
    pts = torch.tensor([[[0.0, 0.0], [4.0, 3.0], [2.0, 1.0]]])
    idx, _ = match(src, dst, points=pts)
    assert idx.tolist() == [[0 * 8 + 2 + 8, 3 * 8 + 6 + 8, 1 * 8 + 4 + 8]]
    sampled = sample_points(src, torch.tensor([[[1.5, 0.25]]]))
    manual = (0.75 * (src[..., 0, 1] + src[..., 0, 2]) / 2 + 0.25 * (src[..., 1, 1] + src[..., 1, 2]) / 2)
    torch.testing.assert_close(sampled[0, 0], manual[0])
    # soft-argmax stays within the window and is pulled towards similar neighbours
    refined, _ = match(src, dst, coords="feature", refine=True, window=3, temperature=0.05)
    assert torch.all((refined - expected).abs() <= 1.0)
    sharp, _ = match(src, dst, coords="feature", refine=True, temperature=1e-4)
    torch.testing.assert_close(sharp, expected, atol=1e-3, rtol=0)


def test_mutual_coordinates_nan_where_absent():
    dst = torch.eye(3)[None].reshape(1, 3, 1, 3)   # [B, C=3, h=1, w=3]: one-hot target vectors
    src = torch.eye(3)[[0, 0, 1]][None]            # two sources compete for target 0
    xy, _ = match(src, dst, mutual=True, coords="feature")
    assert xy[0, 0].tolist() == [0.0, 0.0] and torch.isnan(xy[0, 1]).all() and xy[0, 2].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("disable,kernel", [("avx512", "avx2"), ("avx512,avx2", "portable")])
def test_every_simd_path_agrees(disable, kernel):
    """The run-time dispatch falls back when told to, and every micro-kernel gives the same answer."""
    code = (
        "import json, torch, cleandift_rt\n"
        "from cleandift_rt import match\n"
        "g = torch.Generator().manual_seed(5)\n"
        "s, d = torch.randn(2, 77, 45, generator=g), torch.randn(2, 101, 45, generator=g)\n"
        "i, v = match(s, d, mutual=True); ik, vk = match(s, d, k=4)\n"
        "print(json.dumps({'kernel': cleandift_rt.build_info()['match_cpu_kernel'], 'i': i.tolist(),"
        " 'v': v.tolist(), 'ik': ik.tolist(), 'vk': vk.tolist()}))\n"
    )
    env = dict(os.environ, CLEANDIFT_DISABLE_SIMD=disable)
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                    text=True).stdout)
    assert out["kernel"] == kernel
    g = torch.Generator().manual_seed(5)
    s, d = torch.randn(2, 77, 45, generator=g), torch.randn(2, 101, 45, generator=g)
    i, v = match(s, d, mutual=True)
    ik, vk = match(s, d, k=4)
    assert out["i"] == i.tolist() and out["ik"] == ik.tolist()
    np.testing.assert_allclose(out["v"], v.numpy(), atol=2e-6)
    np.testing.assert_allclose(out["vk"], vk.numpy(), atol=2e-6)


def test_more_than_2_to_the_31_similarities():
    """N * M > 2^31 (C = 1 keeps it fast): signs decide, the first target of the right sign wins."""
    n, m = 46_500, 46_500
    src = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).reshape(1, n, 1)
    dst = -torch.ones(1, m, 1)
    dst[0, m - 3] = 2.0
    index, sim = match(src, dst, mutual=True)
    # target m - 3 is best for every even source, target 0 for every odd one: only the first of each is mutual
    assert index[0, 0] == m - 3 and index[0, 1] == 0 and torch.all(index[0, 2:] == -1)
    index, sim = match(src, dst)
    assert torch.all(index[0, ::2] == m - 3) and torch.all(index[0, 1::2] == 0)
    assert torch.all(sim == 1)


layouts = st.sampled_from(["rows", "map", "strided"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), n=st.integers(1, 40), m=st.integers(1, 40), c=st.integers(1, 70),
       k=st.integers(1, 4), mutual=st.booleans(), layout=layouts, seed=st.integers(0, 2**31 - 1),
       pool=st.sampled_from([0, 1, 3]))
def test_property_against_brute_force(b, n, m, c, k, mutual, layout, seed, pool):
    gen = torch.Generator().manual_seed(seed)
    exact_ties = pool > 0 and c > 1  # with C = 1 every nonzero vector normalises to +-1 (up to rounding)
    if pool:
        src, dst = pooled(gen, b, n, c, pool), pooled(gen, b, m, c, pool)
    else:
        src, dst = torch.randn(b, n, c, generator=gen), torch.randn(b, m, c, generator=gen)
    k = 1 if mutual else min(k, m)
    if layout == "map":  # [B, C, 1, n]: channel-strided rows, read in place
        s_in, d_in = src.transpose(1, 2)[:, :, None, :], dst.transpose(1, 2)[:, :, None, :]
    elif layout == "strided":
        s_in = src.transpose(1, 2).contiguous().transpose(1, 2)
        d_in = torch.stack([dst, dst], -1)[..., 1]
    else:
        s_in, d_in = src, dst
    index, sim = match(s_in, d_in, mutual=mutual, k=k)
    if k == 1:
        index, sim = index[..., None], sim[..., None]
    ref = brute_similarity(src, dst)
    if mutual:
        expected, safe = brute_mutual(ref, exact_ties)
        assert torch.equal(index[..., 0][safe], expected[safe])
        torch.testing.assert_close(sim[..., 0].double(), ref.max(-1).values, atol=1e-5, rtol=0)
    else:
        order, vals = ranked(ref)
        torch.testing.assert_close(sim.double(), vals[..., :k], atol=1e-5, rtol=0)
        clear = unambiguous(vals, k, exact_ties)
        assert torch.equal(index[clear], order[..., :k][clear])


def test_public_names():
    assert cleandift_rt.match is match


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA entry point's host side without a GPU")
def test_cuda_entry_point_host_side():
    """Arguments are checked before any CUDA call; without a driver the call fails with a clear error."""
    from cleandift_rt.build_info import native

    if not cleandift_rt.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            native().match_cuda(0, 1, 4, 8, 0, 1, 4, 8, "float16", False, 1, 0, 0, 0)
        return
    with pytest.raises(ValueError, match="k = 5 exceeds the 4 target"):
        native().match_cuda(0, 1, 4, 8, 0, 1, 4, 8, "float16", False, 5, 0, 0, 0)
    with pytest.raises(ValueError, match="k <= 32 on the GPU"):
        native().match_cuda(0, 1, 4, 8, 0, 1, 40, 8, "bfloat16", False, 33, 0, 0, 0)
    # Each buffer's own shape reaches the argument check, so mismatches never reach a kernel.
    with pytest.raises(ValueError, match="src has batch 2 but dst has batch 1"):
        native().match_cuda(0, 2, 4, 8, 0, 1, 4, 8, "float32", False, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="src has 8 channels and dst 16"):
        native().match_cuda(0, 1, 4, 8, 0, 1, 4, 16, "float32", False, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"match \(CUDA\) allocating src inverse norms: cudaError"):
        native().match_cuda(0, 1, 4, 8, 0, 1, 4, 8, "float32", True, 1, 0, 0, 0)


def test_refinement_in_chunks_and_half_precision_points():
    from cleandift_rt.kernels.refine import soft_argmax

    gen = torch.Generator().manual_seed(4)
    dst = torch.randn(2, 8, 5, 6, generator=gen)
    src = torch.randn(2, 30, 8, generator=gen)
    index, _ = match(src, dst)
    whole = soft_argmax(src, dst, index, 3, 0.1)
    assert torch.allclose(soft_argmax(src, dst, index, 3, 0.1, chunk_bytes=1), whole)
    src_map = torch.randn(1, 8, 4, 4, generator=gen)
    pts = torch.tensor([[[1.25, 2.5], [0.0, 3.0]]])
    got = match(src_map.bfloat16(), dst[:1].bfloat16(), points=pts)[0]
    ref = match(sample_points(src_map.bfloat16(), pts), dst[:1].bfloat16())[0]
    assert torch.equal(got, ref)


def test_concurrent_calls_release_the_gil_and_agree():
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(6)
    pairs = [(torch.randn(2, 300, 64, generator=gen), torch.randn(2, 280, 64, generator=gen)) for _ in range(4)]
    expected = [match(s, d, mutual=True) for s, d in pairs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: match(p[0], p[1], mutual=True), pairs))
    for (gi, gv), (ei, ev) in zip(got, expected):
        assert torch.equal(gi, ei) and torch.equal(gv, ev)
