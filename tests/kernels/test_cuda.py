"""CUDA kernels against PyTorch references: every dtype, partial tiles, ties, zero vectors, N*M > 2^31, streams.

Marked ``cuda``: they run where a GPU is (``python bench/gpu_check.py`` runs them) and skip
elsewhere. ``CLEANDIFT_TEST_DEVICE=cpu`` runs the same checks on the CPU kernels, which is how the
test logic itself is exercised on machines without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from match_reference import brute_mutual, brute_similarity, pooled, ranked, unambiguous

import cleandift_rt
from cleandift_rt import match, project
from cleandift_rt.models.heads import ProjectionHeads

DEVICE = os.environ.get("CLEANDIFT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda
if DEVICE == "cuda" and not (torch.cuda.is_available() and cleandift_rt.build_info()["cuda_compiled"]):
    pytestmark = [pytest.mark.cuda, pytest.mark.skip(reason="needs a CUDA device and a CUDA build of cleandift_rt "
                                                            "(python bench/gpu_check.py runs these)")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIM_ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}  # vs float64 of the same stored values


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


# The CUDA kernel multiplies fp16 / bf16 inputs exactly (fp32 sums); on the CPU, bf16 inputs default to
# the kernel that rounds the normalised rows to bf16, so the CPU run of these checks asks for fp32.
CPU_TWIN = {"precision": "fp32"} if DEVICE == "cpu" else {}


def _match(*args, **kwargs):
    return match(*args, **CPU_TWIN, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,m,c", [(1, 1, 1, 1), (1, 63, 65, 16), (2, 65, 63, 33), (1, 130, 257, 640),
                                     (3, 64, 128, 320), (1, 17, 4099, 8)])
def test_match_random_every_dtype_and_partial_tile(dtype, b, n, m, c):
    gen = torch.Generator().manual_seed(n * 7 + m + c)
    src, dst = (torch.randn(b, n, c, generator=gen).to(dtype), torch.randn(b, m, c, generator=gen).to(dtype))
    ref = brute_similarity(src.float(), dst.float())  # the reference sees exactly the stored values
    for k in (1, 4):
        k = min(k, m)
        index, sim = _match(*_on_device(src, dst), k=k)
        index, sim = index.cpu().reshape(b, n, k), sim.cpu().reshape(b, n, k)
        order, vals = ranked(ref)
        torch.testing.assert_close(sim.double(), vals[..., :k], atol=SIM_ATOL[dtype], rtol=0)
        clear = unambiguous(vals, k)
        assert torch.equal(index[clear], order[..., :k][clear])


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_ties_zero_vectors_and_mutual(dtype):
    gen = torch.Generator().manual_seed(3)
    src, dst = pooled(gen, 2, 150, 40, 3).to(dtype), pooled(gen, 2, 170, 40, 3).to(dtype)
    src[0, 0] = 0  # a zero source vector: similarity 0 everywhere, target 0 wins
    ref = brute_similarity(src.float(), dst.float())
    index, sim = _match(*_on_device(src, dst))
    order, vals = ranked(ref)
    clear = unambiguous(vals, 1, exact_ties=True)
    assert torch.equal(index.cpu()[clear], order[..., 0][clear])
    assert index[0, 0].item() == 0 and sim[0, 0].item() == 0
    mutual, _ = _match(*_on_device(src, dst), mutual=True)
    expected, safe = brute_mutual(ref, exact_ties=True)
    assert torch.equal(mutual.cpu()[safe], expected[safe])


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_more_than_2_to_the_31_similarities(dtype):
    n = m = 46_500
    src = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).reshape(1, n, 1).to(dtype)
    dst = -torch.ones(1, m, 1, dtype=dtype)
    dst[0, m - 3] = 2.0
    index, sim = _match(*_on_device(src, dst), mutual=True)
    index = index.cpu()
    assert index[0, 0] == m - 3 and index[0, 1] == 0 and torch.all(index[0, 2:] == -1)
    index, sim = _match(*_on_device(src, dst))
    assert torch.all(index.cpu()[0, ::2] == m - 3) and torch.all(index.cpu()[0, 1::2] == 0)


def test_match_on_a_side_stream_equals_the_default_stream():
    if DEVICE != "cuda":
        pytest.skip("streams are a CUDA matter")
    gen = torch.Generator().manual_seed(9)
    src, dst = _on_device(torch.randn(4, 500, 64, generator=gen).half(), torch.randn(4, 700, 64, generator=gen).half())
    want = match(src, dst, mutual=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = match(src * 1, dst * 1, mutual=True)  # inputs written on the side stream itself
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _heads(dim: int, seed: int, conditioning: str = "adarms", scale: float = 0.05) -> ProjectionHeads:
    torch.manual_seed(seed)
    heads = ProjectionHeads({"us6": dim}, conditioning=conditioning)
    with torch.no_grad():  # the zero-initialised weights too, so the head is far from the identity
        for p in heads.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return heads.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,hw,batch", [(64, (5, 7), 1), (320, (8, 8), 2), (1280, (3, 11), 1)])
def test_project_every_dtype_against_the_pytorch_head(dtype, dim, hw, batch):
    heads = _heads(dim, dim)
    feats = torch.randn(batch, dim, *hw, generator=torch.Generator().manual_seed(dim)).to(dtype)
    with torch.no_grad():
        want = heads("us6", feats.float(), 500)
    got = project(*_on_device(feats), 500, heads.to(DEVICE), "us6").cpu()
    assert got.dtype == dtype and got.shape == feats.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want).norm() / want.norm()).item() < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,hw,batch", [(64, (5, 7), 2), (1280, (3, 11), 1)])
def test_project_film_heads_against_the_pytorch_head(dtype, dim, hw, batch):
    """FiLM heads (scale and shift, no RMS statistics kernel) with per-sample timesteps."""
    heads = _heads(dim, dim + 1, "film", scale=0.02)
    feats = (torch.randn(batch, dim, *hw, generator=torch.Generator().manual_seed(dim)) + 0.5).to(dtype)
    t = torch.tensor([30.0, 800.0][:batch])
    with torch.no_grad():
        want = heads("us6", feats.float(), t)
    got = project(*_on_device(feats), t, heads.to(DEVICE), "us6").cpu()
    assert got.dtype == dtype and got.shape == feats.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got.float() - want).norm() / want.norm()).item() < tol


def test_project_on_a_side_stream_equals_the_default_stream():
    if DEVICE != "cuda":
        pytest.skip("streams are a CUDA matter")
    heads = _heads(320, 1).to(DEVICE)
    feats = torch.randn(2, 320, 12, 12, device=DEVICE)
    want = project(feats, 261, heads, "us6")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = project(feats * 1, 700, heads, "us6")  # a new t: cond and scales made on this stream
        again = project(feats * 1, 261, heads, "us6")  # cached weights made on the default stream
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(again, want) and not torch.equal(got, want)
