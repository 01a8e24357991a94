"""The AMX-BF16 kernels of match and project, tested on every CPU through their emulated tile layer.

CLEANDIFT_CPU_KERNEL=amx_emulated runs the AMX kernel source over a portable emulation of tileloadd,
tilestored, tilezero and tdpbf16ps (csrc/ops/cpu/amx_tiles.h). Here:

* the emulated tdpbf16ps against a numpy transcription of the Intel SDM's pseudo-code;
* match against a reference that rounds and sums as the kernel does (bf16 inputs, fp32 sums in
  tdpbf16ps's order): bit-identical similarities and indices; and against fp32 within the bf16 bound;
* the contracts of test_match.py (ties, mutual, top-k, zero vectors, partial tiles, layouts,
  N * M > 2^31 on the maps path);
* project (AdaRMS and FiLM) against the PyTorch head with test_bf16.py's tolerances;
* kernel selection (CLEANDIFT_CPU_KERNEL, build_info's reasons);
* on a CPU with AMX: the real kernel equals the emulated one bit for bit (skipped elsewhere).

The emulation is slow (a few microseconds per tdpbf16ps), so sizes stay small except where a
contract needs size.
"""

from __future__ import annotations

import contextlib
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
from match_reference import bf16_bound, brute_mutual, check_against, exact_unit, pooled, ranked, rounded_unit
from random_heads import random_heads

import cleandift_rt
from cleandift_rt import match, project
from cleandift_rt.build_info import native

FLT_MIN = 2.0**-126
HAS_AMX = "amx_bf16" in cleandift_rt.build_info()["simd"]


@contextlib.contextmanager
def cpu_kernel(name: str):
    """match / project run the kernel `name` inside (the variable is read at every call)."""
    old = os.environ.get("CLEANDIFT_CPU_KERNEL")
    os.environ["CLEANDIFT_CPU_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["CLEANDIFT_CPU_KERNEL"]
        else:
            os.environ["CLEANDIFT_CPU_KERNEL"] = old


@pytest.fixture
def emulated():
    """The AMX kernel over emulated tiles for the whole test."""
    with cpu_kernel("amx_emulated"):
        yield


# --- the emulated instruction --------------------------------------------------------------------

def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def flush(x: np.ndarray) -> np.ndarray:
    """Denormals to zero, keeping the sign (DAZ for inputs, FTZ for results)."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < FLT_MIN, np.copysign(np.float32(0), x), x).astype(np.float32)


def tdpbf16ps_sdm(c: np.ndarray, a_bits: np.ndarray, b_bits: np.ndarray) -> np.ndarray:
    """TDPBF16PS as the Intel SDM's pseudo-code writes it: for each row m, temp1[2n] and temp1[2n+1]
    start at 0 and take the even and the odd products of every pair k in turn (FP32 FMA, DAZ = FTZ =
    1, round to nearest even); then dst[m][n] := dst[m][n] + (temp1[2n] + temp1[2n+1]).

    The FMA is a float64 sum rounded once to float32: exact for the data below (bf16 products have
    16 significant bits; magnitudes keep every sum within 53 bits)."""
    a, b = flush(bf16_values(a_bits)), flush(bf16_values(b_bits))  # DAZ
    rows, pairs, cols = a.shape[0], a.shape[1] // 2, b.shape[1] // 2
    out = np.empty((rows, cols), np.float32)
    for m in range(rows):
        temp = np.zeros(2 * cols, np.float32)
        for k in range(pairs):
            a_pair = np.tile(a[m, 2 * k:2 * k + 2], cols).astype(np.float64)  # a0, a1, a0, a1, ... like b's row
            temp = flush((temp.astype(np.float64) + a_pair * b[k].astype(np.float64)).astype(np.float32))
        out[m] = flush(flush(c[m]) + flush(temp[0::2] + temp[1::2]))
    return out


def random_bf16(gen: np.random.Generator, shape, exponents: tuple[int, int]) -> np.ndarray:
    """bf16 bits: signs and 7-bit mantissas at random, exponents in [lo, hi); some +-0 and some
    denormals (which the instruction reads as zero)."""
    exponent = gen.integers(127 + exponents[0], 127 + exponents[1], shape)
    bits = (gen.integers(0, 2, shape) << 15) | (exponent << 7) | gen.integers(0, 128, shape)
    special = gen.random(shape)
    bits = np.where(special < 0.05, bits & 0x8000, bits)                                            # +-0
    bits = np.where((special >= 0.05) & (special < 0.1), (bits & 0x8000) | gen.integers(1, 128, shape), bits)
    return bits.astype(np.uint16)


# (a's exponents, b's exponents, dst's scale), one for each way the emulation computes: values
# around 1 (no sum can be denormal); small ones (normal products, sums that can cancel into
# denormals); tiny ones (products below fp32's normal range too).
RANGES = {"normal": ((-8, 8), (-8, 8), 2.0**3), "small": ((-64, -60), (-62, -58), 2.0**-118),
          "tiny": ((-70, -60), (-66, -56), 2.0**-122)}


@pytest.mark.parametrize("rows,pairs,cols", [(16, 16, 16), (13, 12, 10), (1, 1, 1), (5, 16, 3), (16, 7, 16)])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("ranges", sorted(RANGES))
def test_emulated_tdpbf16ps_is_the_sdm_pseudocode(rows, pairs, cols, accumulate, ranges):
    """Random tiles, full and partial (rows, columns and pairs below 16): bit-identical results.
    The data keeps every exact sum within 50 bits, so the transcription's float64 FMA is exact."""
    gen = np.random.default_rng(rows * 1000 + pairs * 10 + cols)
    a_exp, b_exp, c_scale = RANGES[ranges]
    for _ in range(5):
        a, b = random_bf16(gen, (rows, 2 * pairs), a_exp), random_bf16(gen, (pairs, 2 * cols), b_exp)
        c = (gen.standard_normal((rows, cols)) * c_scale).astype(np.float32)
        got = native().tile_dpbf16ps_emulated(c if accumulate else None, a, b)
        want = tdpbf16ps_sdm(c if accumulate else np.zeros_like(c), a, b)
        assert got.shape == (rows, cols) and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def bits_of(*values: float) -> np.ndarray:
    return (np.array(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_emulated_tdpbf16ps_order_and_denormals():
    """Hand-derived cases, each checked against the transcription too."""
    def both(c, a, b):
        got = native().tile_dpbf16ps_emulated(np.array([c], np.float32), np.array([a], np.uint16), b)
        want = tdpbf16ps_sdm(np.array([c], np.float32), np.array([a], np.uint16), b)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        return got[0]

    ones = bits_of(1.0, 1.0, 1.0, 1.0).reshape(2, 2)  # 2 pairs x 1 column
    # The SDM's order: even and odd products summed apart from dst, then added to it. 1 + four
    # products of 2^-25 is 1 + 2^-23; adding them to dst one by one (the intrinsics guide's reading)
    # would leave 1.0 (each 2^-25 is below half an ulp of 1).
    assert both([1.0], bits_of(*[2.0**-25] * 4), ones)[0] == np.float32(1 + 2.0**-23)
    # DAZ: a bf16 denormal input is zero (else 2^-127 * 2^100 = 2^-27 would count).
    huge = bits_of(2.0**100, 2.0**100).reshape(1, 2)
    assert both([0.0], np.array([0x0040, 0], np.uint16), huge)[0] == 0
    # FTZ: products of -2^-140 (denormal sums) become zeros with their sign: -0 + (-0 + -0) is -0
    # (without FTZ: -2^-139).
    tiny = both([-0.0], bits_of(-(2.0**-70), -(2.0**-70)), bits_of(2.0**-70, 2.0**-70).reshape(1, 2))
    assert tiny[0] == 0 and np.signbit(tiny[0])
    # DAZ on dst: a negative denormal dst reads as -0, and -0 + +0 is +0 (without DAZ: -1e-39, flushed to -0).
    zero = both([-1e-39], bits_of(0.0, 0.0), bits_of(1.0, 1.0).reshape(1, 2))
    assert zero[0] == 0 and not np.signbit(zero[0])


def test_emulated_tile_shapes_are_checked():
    a, b = np.zeros((4, 8), np.uint16), np.zeros((3, 4), np.uint16)  # 4 pairs in a, 3 rows in b
    with pytest.raises(ValueError, match="b with K rows"):
        native().tile_dpbf16ps_emulated(None, a, b)


# --- match ------------------------------------------------------------------------------------------

def amx_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[B, N, M] float32 similarities exactly as the AMX kernel computes them: vectors normalised in
    fp32 and rounded to bf16 (rounded_unit), channels zero-padded to blocks of 32; per block, the
    even and the odd channels' products summed apart (fp32, in channel order), their sum added to
    the running similarity; denormal results flushed. The bf16 products are exact in fp32 (asserted),
    so fp32 multiply-then-add is the instruction's FMA."""
    u, v = rounded_unit(src).float().numpy(), rounded_unit(dst).float().numpy()
    pad = -u.shape[-1] % 32
    u, v = (np.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (u, v))
    sim = np.zeros((u.shape[0], u.shape[1], v.shape[1]), np.float32)
    for block in range(0, u.shape[-1], 32):
        a, b = u[:, :, None, block:block + 32], v[:, None, :, block:block + 32]
        products = a * b
        assert np.array_equal(products.astype(np.float64), a.astype(np.float64) * b), "an inexact fp32 product"
        even, odd = np.zeros_like(sim), np.zeros_like(sim)
        for k in range(0, 32, 2):
            even, odd = flush(even + products[..., k]), flush(odd + products[..., k + 1])
        sim = flush(sim + flush(even + odd))
    return torch.from_numpy(sim)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def check_exact(src, dst, index, sim, k: int, mutual: bool):
    """index / sim [B, N, k] equal the AMX reference's ranking: values bit for bit, ties to the lowest index."""
    ref = amx_similarity(src, dst)
    if mutual:
        expected, _ = brute_mutual(ref)
        assert torch.equal(index[..., 0], expected)
        assert_bits_equal(sim[..., 0], ref.max(-1).values)
        return
    order, vals = ranked(ref)
    assert torch.equal(index, order[..., :k])
    assert_bits_equal(sim, vals[..., :k])


layouts = st.sampled_from(["rows", "map", "strided"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), n=st.integers(1, 40), m=st.integers(1, 60), c=st.integers(1, 70),
       k=st.integers(1, 4), mutual=st.booleans(), layout=layouts, seed=st.integers(0, 2**31 - 1),
       pool=st.sampled_from([0, 1, 3]))
def test_match_equals_its_same_rounding_reference(b, n, m, c, k, mutual, layout, seed, pool):
    """Every mode and layout, partial tiles everywhere (N, M, C below the 32 x 32 x 32 blocks),
    duplicated and zero vectors (pool: vectors drawn from a few, plus the zero vector)."""
    with cpu_kernel("amx_emulated"):  # not a fixture: hypothesis runs every example in one test call
        gen = torch.Generator().manual_seed(seed)
        src, dst = (pooled(gen, b, n, c, pool), pooled(gen, b, m, c, pool)) if pool else \
            (torch.randn(b, n, c, generator=gen), torch.randn(b, m, c, generator=gen))
        k = 1 if mutual else min(k, m)
        if layout == "map":  # [B, C, 1, n]: channel-strided rows, read in place
            s_in, d_in = src.transpose(1, 2)[:, :, None, :], dst.transpose(1, 2)[:, :, None, :]
        elif layout == "strided":
            s_in, d_in = src.transpose(1, 2).contiguous().transpose(1, 2), torch.stack([dst, dst], -1)[..., 1]
        else:
            s_in, d_in = src, dst
        index, sim = match(s_in, d_in, mutual=mutual, k=k, precision="bf16")
        index, sim = index.reshape(b, n, k), sim.reshape(b, n, k)
        check_exact(src, dst, index, sim, k, mutual)
        if not mutual:  # and the fp32 contract: within the bf16 bound, exact where the gaps exceed it
            check_against(src, dst, index, sim, exact_unit, 2 * bf16_bound(c), k=k, exact_ties=False,
                          min_settled=0.0)


def test_match_many_blocks_against_reference_and_fp32(emulated):
    """C = 320: ten 32-deep steps in two KC slices (the accumulator tiles reloaded between them);
    sources are noisy copies of targets, so most rows have a clear best match against fp32."""
    gen = torch.Generator().manual_seed(3)
    dst = torch.randn(2, 230, 320, generator=gen)
    src = dst[:, torch.randint(0, 230, (150,), generator=gen)] + torch.randn(2, 150, 320, generator=gen)
    index, sim = match(src, dst, k=3, precision="bf16")
    check_exact(src, dst, index, sim, 3, False)
    index, sim = match(src, dst, precision="bf16")
    check_against(src, dst, index, sim, exact_unit, 2 * bf16_bound(320), exact_ties=False)
    assert cleandift_rt.build_info()["cpu_kernel_bf16"] == "amx_emulated"


def test_ties_lowest_index_wins(emulated):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 37, generator=gen)
    dst = torch.cat([base, base, base, torch.randn(55, 37, generator=gen), base])[None]
    src = base[None] * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])[None, :, None]
    index, sim = match(src, dst, precision="bf16")
    assert torch.equal(index, torch.arange(5)[None]) and (sim - 1).abs().max() < bf16_bound(37)
    index, _ = match(src, dst, k=3, precision="bf16")
    assert torch.equal(index[0], torch.stack([torch.arange(5), torch.arange(5) + 5, torch.arange(5) + 10], -1))
    same = torch.randn(1, 1, 19).expand(1, 1000, 19).contiguous()  # across blocks and column chunks
    assert torch.all(match(torch.randn(1, 64, 19), same, precision="bf16")[0] == 0)
    index, _ = match(torch.eye(4)[[2, 0, 2, 1]][None], torch.eye(4)[None], mutual=True, precision="bf16")
    assert index.tolist() == [[2, 0, -1, 1]]  # sources 0 and 2 are the same vector: the lower one is mutual


def test_zero_vectors(emulated):
    src = torch.randn(1, 4, 10)
    src[0, 2] = 0
    dst = -torch.rand(1, 6, 10) - 0.1
    dst[0, 3] = 0
    index, sim = match(src.abs(), dst, precision="bf16")
    assert index.tolist() == [[3, 3, 0, 3]] and torch.all(sim == 0)
    assert match(src, dst, precision="bf16")[0][0, 2] == 0


def test_bf16_inputs_default_to_the_forced_kernel(emulated):
    gen = torch.Generator().manual_seed(4)
    src, dst = torch.randn(1, 40, 24, generator=gen).bfloat16(), torch.randn(1, 50, 24, generator=gen).bfloat16()
    index, sim = match(src, dst)
    check_exact(src.float(), dst.float(), index[..., None], sim[..., None], 1, False)


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
def test_more_than_2_to_the_31_similarities_on_the_maps_path(emulated):
    """N * M > 2^31 as [1, 1, h, w] maps (C = 1, padded to one 32-deep step): signs decide, the first
    target of the right sign wins; one mutual pass checks both directions."""
    h, w = 150, 310  # 46,500 vectors a side
    n = h * w
    src = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).reshape(1, 1, h, w)
    dst = -torch.ones(1, 1, h, w)
    dst.view(-1)[n - 3] = 2.0
    index, sim = match(src, dst, mutual=True, precision="bf16")
    assert index[0, 0] == n - 3 and index[0, 1] == 0 and torch.all(index[0, 2:] == -1)
    assert torch.all(sim == 1)


# --- project ----------------------------------------------------------------------------------------

def bf16_head_reference(heads, x: torch.Tensor, t) -> torch.Tensor:
    """The head with the kernel's roundings (either conditioning): weights and both GEMMs' inputs to
    bf16, everything else in float64."""
    bf = lambda w: w.detach().float().bfloat16().double()  # noqa: E731
    b, d, h, w = x.shape
    with torch.no_grad():
        cond = heads.cond(t, batch=b).float()
        xs = x.flatten(2).transpose(1, 2).double()
        for layer in heads.adapters["us6"].layers:
            scale, shift = layer.modulation(cond)
            if shift is None:
                rinv = 1 / (xs.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
                modulated = xs * rinv * scale.double()[:, None, :]
            else:
                modulated = xs * scale.double()[:, None, :] + shift.double()[:, None, :]
            y = bf(modulated) @ bf(layer.up_proj.weight).T
            value, gate = y[..., :d], y[..., d:]
            xs = xs + bf(value * F.silu(gate)) @ bf(layer.down_proj.weight).T
    return xs.transpose(1, 2).reshape(b, d, h, w)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("conditioning", ["adarms", "film"])
@pytest.mark.parametrize("dim,shape", [(64, (2, 5, 7)), (33, (1, 3, 3)), (320, (1, 7, 11))])
def test_project_against_its_rounded_reference_and_fp32(emulated, conditioning, dim, shape):
    """D = 33: depth padded to a 32-deep step; D = 320: more than one 256-deep weight slice; pixel
    counts that leave partial 32-row blocks. Tolerances as in test_bf16.py; FiLM heads with the
    smaller weights of test_fused_heads.py (no normalisation: 0.05 grows activations into the 1000s)."""
    heads = random_heads({"us6": dim}, seed=dim, scale=0.05 if conditioning == "adarms" else 0.02,
                         conditioning=conditioning)
    b, h, w = shape
    x = torch.randn(b, dim, h, w, generator=torch.Generator().manual_seed(dim)) * 2
    out = project(x, 261, heads, "us6", precision="bf16")
    assert out.dtype == torch.float32 and out.shape == x.shape
    with torch.no_grad():
        ref32 = heads("us6", x, 261)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = heads("us6", x, 261)
    emulated_ref = bf16_head_reference(heads, x, 261)
    scale = emulated_ref.abs().max()
    per_pixel = (out.double() - emulated_ref).abs().amax(1).flatten() / scale
    assert per_pixel.median() < 1e-5, per_pixel.median()
    mean_vs_rounded = (out.double() - emulated_ref).abs().mean()
    assert mean_vs_rounded < 0.1 * (out.double() - ref32.double()).abs().mean()  # bf16 really ran
    assert rel_error(out, ref32) < 2e-2 and rel_error(out, autocast) < 2e-2


def test_project_packs_per_kernel():
    """The packed weights are cached per kernel: switching CLEANDIFT_CPU_KERNEL repacks them."""
    heads = random_heads({"us6": 48}, seed=5)
    x = torch.randn(1, 48, 4, 6)
    project(x, 261, heads, "us6", precision="bf16")  # packs for this CPU's own bf16 kernel (or fp32)
    with cpu_kernel("amx_emulated"):
        out = project(x, 261, heads, "us6", precision="bf16")
        fresh = project(x, 261, random_heads({"us6": 48}, seed=5), "us6", precision="bf16")
        up = torch.zeros(3, 96, 48)
        assert native().pack_head(up.numpy(), up[:, :48].contiguous().numpy(), "bfloat16").kernel == "amx_emulated"
    assert torch.equal(out, fresh)


# --- selection ---------------------------------------------------------------------------------------

def test_forced_kernels_that_cannot_run_are_clear_errors():
    src, dst = torch.randn(1, 5, 8), torch.randn(1, 6, 8)
    with cpu_kernel("avx9"):
        with pytest.raises(ValueError, match="CLEANDIFT_CPU_KERNEL=avx9 names no CPU kernel; use one of amx, "):
            match(src, dst)
        info = cleandift_rt.build_info()
        assert info["cpu_kernel_forced"] == "avx9" and "names no CPU kernel" in info["cpu_kernel_error"]
    with cpu_kernel("amx"):
        if HAS_AMX:
            assert cleandift_rt.build_info()["cpu_kernel_bf16"] == "amx"
            return
        reason = cleandift_rt.build_info()["amx_unavailable"]
        with pytest.raises(ValueError, match=f"CLEANDIFT_CPU_KERNEL=amx, but this CPU cannot run it: {reason[:20]}"):
            match(src, dst, precision="bf16")
        match(src, dst)  # fp32 work keeps its own kernel


def test_build_info_says_which_kernel_and_why_not_amx():
    info = cleandift_rt.build_info()
    if HAS_AMX:
        assert info["cpu_kernel_bf16"] == "amx" and info["amx_unavailable"] is None
    else:
        assert info["cpu_kernel_bf16"] != "amx" and info["amx_unavailable"]
        assert f"AMX not used: {info['amx_unavailable']}" in cleandift_rt.format_build_info(info)


def test_emulated_kernel_runs_without_native_bf16():
    """A CPU with no AVX-512 at all (the SIMD hidden): the emulated kernel is still selectable, bf16
    asked for runs it without the no-native-bf16 warning, and its bits equal this process's run."""
    code = (
        "import json, warnings, torch, cleandift_rt\n"
        "warnings.simplefilter('error')\n"
        "g = torch.Generator().manual_seed(6)\n"
        "s, d = torch.randn(2, 45, 40, generator=g), torch.randn(2, 70, 40, generator=g)\n"
        "i, v = cleandift_rt.match(s, d, k=2, precision='bf16')\n"
        "info = cleandift_rt.build_info()\n"
        "print(json.dumps({'simd': info['simd'], 'bf16': info['cpu_kernel_bf16'], 'fp32': info['match_cpu_kernel'],\n"
        "                  'amx': info['amx_unavailable'], 'i': i.tolist(), 'v': v.view(torch.int32).tolist()}))\n"
    )
    env = dict(os.environ, CLEANDIFT_DISABLE_SIMD="avx512,avx2,amx", CLEANDIFT_CPU_KERNEL="amx_emulated")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["simd"] == [] and got["bf16"] == "amx_emulated" and got["fp32"] == "portable" and got["amx"]
    with cpu_kernel("amx_emulated"):
        g = torch.Generator().manual_seed(6)
        s, d = torch.randn(2, 45, 40, generator=g), torch.randn(2, 70, 40, generator=g)
        i, v = match(s, d, k=2, precision="bf16")
    assert got["i"] == i.tolist() and got["v"] == v.view(torch.int32).tolist()


# --- the real kernel (AMX CPUs only) ----------------------------------------------------------------

@pytest.mark.skipif(not HAS_AMX, reason="no usable AMX-BF16 on this CPU (build_info()['amx_unavailable'] says why): "
                    "the real tile kernel cannot run here; the emulated one carries the correctness")
def test_real_amx_equals_emulated_bit_for_bit():
    gen = torch.Generator().manual_seed(8)
    src, dst = torch.randn(2, 333, 200, generator=gen), torch.randn(2, 290, 200, generator=gen)
    src[:, 7] = 0
    dst[:, 11] = dst[:, 3]
    maps = src.transpose(1, 2).reshape(2, 200, 9, 37), dst.transpose(1, 2).reshape(2, 200, 10, 29)
    heads = {kind: random_heads({"us6": 96}, seed=9, conditioning=kind) for kind in ("adarms", "film")}
    x = torch.randn(2, 96, 13, 11, generator=gen)

    def run(kernel):
        with cpu_kernel(kernel):
            assert cleandift_rt.build_info()["cpu_kernel_bf16"] == kernel
            outs = [*match(src, dst, precision="bf16"), *match(src, dst, mutual=True, precision="bf16"),
                    *match(src, dst, k=5, precision="bf16"), *match(*maps, mutual=True, precision="bf16")]
            return outs + [project(x, 261, h, "us6", precision="bf16") for h in heads.values()]

    for real, emu in zip(run("amx"), run("amx_emulated")):
        assert torch.equal(real.view(torch.int32) if real.dtype == torch.float32 else real,
                           emu.view(torch.int32) if emu.dtype == torch.float32 else emu)
