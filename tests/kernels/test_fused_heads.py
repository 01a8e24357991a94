"""cleandift_rt.project (fused native head) against the PyTorch head heads(tap, features, t)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cleandift_rt
from cleandift_rt import project
from cleandift_rt.models.heads import ProjectionHeads
from random_heads import random_heads


def rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float):
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("tap,dim,shape,t", [
    ("us6", 40, (1, 3, 5), 261),
    ("us3", 72, (2, 4, 4), torch.tensor([10.0, 900.0])),
    ("us9", 33, (3, 1, 1), 0),
    ("mid", 130, (1, 7, 9), 999.0),
    ("us9", 40, (1, 64, 64), 500),  # the largest pixel tiles (32 register tiles), the last one partial
])
def test_fp32_parity(tap, dim, shape, t):
    heads = random_heads({tap: dim})
    b, h, w = shape
    x = torch.randn(b, dim, h, w)
    with torch.no_grad():
        ref = heads(tap, x, t)
    out = project(x, t, heads, tap)
    assert out.shape == x.shape and out.dtype == x.dtype
    rel_close(out, ref, 1e-5)


def test_fp32_parity_release_width():
    """D = 320 (us9 of SD 2.1) on a 16 x 12 map, batch 2."""
    heads = random_heads({"us9": 320}, seed=1)
    x = torch.randn(2, 320, 16, 12) * 3
    with torch.no_grad():
        ref = heads("us9", x, 261)
    rel_close(project(x, 261, heads, "us9"), ref, 1e-5)


@pytest.mark.parametrize("precision,dtype,tol", [("fp32", torch.float32, 1e-5), ("fp32", torch.float16, 1e-2),
                                                 ("bf16", torch.bfloat16, 2e-2)])
def test_film_heads_parity(precision, dtype, tol):
    """FiLM heads (x * (1 + scale) + shift, no normalisation) through the same kernel: per-sample t,
    a cond tensor, SD 2.1's D = 320, and features far from zero mean and unit RMS."""
    from cleandift_rt.kernels.precision import native_bf16

    if precision == "bf16" and not native_bf16():
        pytest.skip("bf16 compute needs AVX512_BF16, which this CPU lacks")
    heads = random_heads({"us9": 320, "us6": 40}, seed=4, scale=0.02, conditioning="film")
    pair = torch.tensor([5.0, 700.0])
    with torch.no_grad():
        pair_cond = heads.cond(pair)
    for tap, x, t, given in [("us9", torch.randn(2, 320, 6, 5) * 2 + 1, torch.tensor([10.0, 900.0]), None),
                             ("us6", torch.randn(1, 40, 64, 9), 261, None),
                             ("us6", torch.randn(2, 40, 3, 3), pair, pair_cond)]:
        x = x.to(dtype)
        with torch.no_grad():
            ref = heads(tap, x.float(), t)
        out = project(x, t if given is None else given, heads, tap, precision=precision)
        assert out.dtype == dtype and out.shape == x.shape
        rel_close(out, ref, tol)


def test_film_identity_at_init():
    heads = ProjectionHeads({"us6": 40}, conditioning="film")
    x = torch.randn(2, 40, 4, 6) * 5 + 2
    assert torch.equal(project(x, 261, heads, "us6"), x)


def test_cond_tensor_and_per_sample_t():
    heads = random_heads({"us6": 48})
    x = torch.randn(2, 48, 5, 6)
    t = torch.tensor([100.0, 500.0])
    with torch.no_grad():
        ref = heads("us6", x, t)
        cond = heads.cond(t)
    rel_close(project(x, cond, heads, "us6"), ref, 1e-5)
    rel_close(project(x, t, heads, "us6"), ref, 1e-5)
    # the cached scales of one t are not reused for another
    with torch.no_grad():
        ref2 = heads("us6", x, 7)
    rel_close(project(x, 7, heads, "us6"), ref2, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parity(dtype):
    """Half-precision features with fp32 heads: the PyTorch head under autocast (every op rounded to
    dtype) within 1e-2, and the fp32 head on the same (upcast) values within 1e-5."""
    heads = random_heads({"us6": 64}, seed=2)
    x = torch.randn(2, 64, 6, 7).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        ref = heads("us6", x, 261)
    with torch.no_grad():
        ref32 = heads("us6", x.float(), 261)
    out = project(x, 261, heads, "us6")
    assert out.dtype == dtype
    rel_close(out, ref, 1e-2)
    rel_close(out, ref32, 1e-2 if dtype == torch.bfloat16 else 1e-3)  # only the output rounding differs


def test_half_output_is_rounded_to_nearest_even():
    heads = random_heads({"us6": 40}, seed=3)
    x = torch.randn(1, 40, 5, 5).half()
    fp32 = project(x.float(), 261, heads, "us6")
    assert torch.equal(project(x, 261, heads, "us6"), fp32.half())
    xb = x.float().bfloat16()
    # precision="fp32": bf16 features default to the bf16 kernel where the CPU has it (tests/kernels/test_bf16.py)
    assert torch.equal(project(xb, 261, heads, "us6", precision="fp32"), project(xb.float(), 261, heads, "us6").bfloat16())


def test_identity_at_init_and_layouts():
    heads = ProjectionHeads({"us6": 40})           # zero-init down_proj: the exact identity
    x = torch.randn(2, 40, 4, 6)
    assert torch.equal(project(x, 261, heads, "us6"), x)
    trained = random_heads({"us6": 40})
    ref = project(x, 261, trained, "us6")
    for layout in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out = project(layout, 261, trained, "us6")
        assert torch.equal(out, ref)


def test_weights_repacked_after_change():
    heads = random_heads({"us6": 40})
    x = torch.randn(1, 40, 3, 3)
    before = project(x, 261, heads, "us6")
    with torch.no_grad():
        heads.adapters["us6"].layers[1].down_proj.weight.mul_(2)
        ref = heads("us6", x, 261)
    after = project(x, 261, heads, "us6")
    assert not torch.equal(after, before)
    rel_close(after, ref, 1e-5)


def test_bad_inputs_rejected_clearly():
    heads = random_heads({"us6": 40})
    x = torch.randn(1, 40, 3, 3)
    with pytest.raises(ValueError, match="no projection head for tap 'us3'"):
        project(x, 261, heads, "us3")
    with pytest.raises(ValueError, match="has 40 channels, features have 41"):
        project(torch.randn(1, 41, 3, 3), 261, heads, "us6")
    with pytest.raises(ValueError, match="B x C x h x w"):
        project(torch.randn(40, 3, 3), 261, heads, "us6")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        project(x.double(), 261, heads, "us6")
    with pytest.raises(ValueError, match="empty"):
        project(torch.randn(0, 40, 3, 3), 261, heads, "us6")
    with pytest.raises(ValueError, match="NaN or Inf"):
        project(x, float("nan"), heads, "us6")
    with pytest.raises(ValueError, match="2 timesteps for a batch of 1"):
        project(x, torch.tensor([1.0, 2.0]), heads, "us6")
    with pytest.raises(ValueError, match=r"cond tensor must be \[B=1, 256\]"):
        project(x, torch.randn(2, 256), heads, "us6")
    with pytest.raises(TypeError, match="t must be a number, a 1-D tensor of B timesteps"):
        project(x, "261", heads, "us6")
    with pytest.raises(TypeError, match="ProjectionHeads"):
        project(x, 261, heads.adapters["us6"], "us6")


def test_native_cpu_entry_point_checks_the_modulation():
    """The binding behind project: a FiLM call without shifts, or AdaRMS with them, is refused by name."""
    from cleandift_rt.build_info import native

    up, down = torch.zeros(3, 16, 8), torch.zeros(3, 8, 8)
    packed = native().pack_head(up.numpy(), down.numpy())
    x, out = torch.randn(1, 4, 8), torch.empty(1, 4, 8)
    scales = torch.ones(3, 1, 8)
    with pytest.raises(ValueError, match="FiLM heads need shifts"):
        native().project_cpu(packed, x.numpy(), out.numpy(), "float32", scales.numpy(), "film")
    with pytest.raises(ValueError, match="AdaRMS heads take no shifts"):
        native().project_cpu(packed, x.numpy(), out.numpy(), "float32", scales.numpy(), "adarms", scales.numpy())
    with pytest.raises(ValueError, match=r"shifts must be \[3, B, D\]"):
        native().project_cpu(packed, x.numpy(), out.numpy(), "float32", scales.numpy(), "film", scales[:, :, :4].numpy())
    native().project_cpu(packed, x.numpy(), out.numpy(), "float32", scales.numpy(), "film", scales.numpy())
    assert torch.equal(out, x)  # zero weights: the residual stream alone


def test_nonfinite_features_rejected_or_propagated_with_flag():
    heads = random_heads({"us6": 40})
    x = torch.randn(2, 40, 3, 4)
    x[1, 7, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at batch 1, channel 7, pixel y=2 x=1\).*allow_nonfinite"):
        project(x, 261, heads, "us6")
    out = project(x, 261, heads, "us6", allow_nonfinite=True)
    with torch.no_grad():
        ref = heads("us6", x, 261)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))        # only the bad pixel's outputs
    clean = ~torch.isnan(ref)
    rel_close(out[clean], ref[clean], 1e-5)


def test_concurrent_calls_equal_serial():
    """The kernel releases the GIL: threads sharing one heads module (its packing and scale caches,
    several taps and timesteps, repacking after a weight change) get the serial results."""
    heads = random_heads({"us6": 40, "us3": 56})
    jobs = [(tap, t, torch.randn(1 + i % 2, dim, 4, 5, generator=torch.Generator().manual_seed(i)))
            for i in range(24) for tap, dim, t in [("us6", 40, 17 * i), ("us3", 56, 900 - 13 * i)]]
    serial = [project(x, t, heads, tap) for tap, t, x in jobs]
    for _ in range(3):
        heads_fresh = random_heads({"us6": 40, "us3": 56})  # same weights, empty caches
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(lambda job: project(job[2], job[1], heads_fresh, job[0]), jobs))
        assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), dim=st.integers(1, 70), h=st.integers(1, 6), w=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       layout=st.sampled_from(["contiguous", "channels_last", "sliced", "transposed"]),
       conditioning=st.sampled_from(["adarms", "film"]), seed=st.integers(0, 2**31 - 1))
def test_property_against_pytorch_head(b, dim, h, w, dtype, layout, conditioning, seed):
    """Any D (not only SIMD-width multiples), map size, batch, dtype, memory layout and head kind."""
    heads = random_heads({"us6": dim}, seed=seed % 1000, conditioning=conditioning)
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":      # a view into a larger map: strides that no contiguous layout has
        x = torch.randn(b, dim + 3, h + 2, w + 1, generator=gen)[:, 1:dim + 1, 1:h + 1, :w]
    elif layout == "transposed":
        x = torch.randn(b, dim, w, h, generator=gen).transpose(2, 3)
    else:
        x = torch.randn(b, dim, h, w, generator=gen)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    with torch.no_grad():
        ref = heads("us6", x.float(), 261)        # the fp32 head on the same (rounded) inputs
    out = project(x, 261, heads, "us6")
    assert out.shape == x.shape and out.dtype == dtype
    rel_close(out, ref, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("disable,kernel", [("avx512", "avx2"), ("avx512,avx2", "portable")])
def test_every_simd_path_matches_pytorch(disable, kernel):
    code = (
        "import torch, cleandift_rt\n"
        "from cleandift_rt.build_info import native\n"
        "from cleandift_rt.models.heads import ProjectionHeads\n"
        "torch.manual_seed(0)\n"
        "err = 0.0\n"
        "for kind in ('adarms', 'film'):\n"
        "    heads = ProjectionHeads({'us6': 50}, conditioning=kind)\n"
        "    with torch.no_grad():\n"
        "        [p.add_(torch.randn_like(p) * 0.05) for p in heads.parameters()]\n"
        "        x = torch.randn(2, 50, 5, 7); ref = heads('us6', x, 261)\n"
        "    out = cleandift_rt.project(x, 261, heads, 'us6')\n"
        "    err = max(err, ((out - ref).abs().max() / ref.abs().max()).item())\n"
        "up = torch.zeros(3, 100, 50); print(native().pack_head(up.numpy(), up[:, :50].contiguous().numpy()).kernel, err)\n"
    )
    env = dict(os.environ, CLEANDIFT_DISABLE_SIMD=disable)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    name, err = out.split()
    assert name == kernel and float(err) < 1e-5


def test_public_names():
    assert cleandift_rt.project is project


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA entry point's host side without a GPU")
def test_cuda_entry_point_host_side():
    from cleandift_rt.build_info import native

    if not cleandift_rt.build_info()["cuda_compiled"]:
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            native().project_cuda(0, 0, 1, 4, 8, "float16", 0, 0, 0, 0)
        return
    with pytest.raises(ValueError, match="empty input"):
        native().project_cuda(0, 0, 0, 4, 8, "float16", 0, 0, 0, 0)
    fake = 64  # a non-null device address: never dereferenced, every call below fails before any kernel
    with pytest.raises(ValueError, match="no modulation scales"):
        native().project_cuda(0, 0, 1, 4, 8, "float16", 0, 0, 0, 0)
    with pytest.raises(ValueError, match="FiLM heads need shifts"):
        native().project_cuda(0, 0, 1, 4, 8, "float16", 0, 0, fake, 0, conditioning="film")
    with pytest.raises(ValueError, match="AdaRMS heads take no shifts"):
        native().project_cuda(0, 0, 1, 4, 8, "float16", 0, 0, fake, 0, shifts=fake)
    with pytest.raises(ValueError, match="unknown head conditioning 'adaln': use adarms or film"):
        native().project_cuda(0, 0, 1, 4, 8, "float16", 0, 0, fake, 0, conditioning="adaln")
    with pytest.raises(RuntimeError, match=r"project \(CUDA\) allocating the residual stream: cudaError"):
        native().project_cuda(0, 0, 1, 4, 8, "bfloat16", 0, 0, fake, 0)
    with pytest.raises(RuntimeError, match=r"project \(CUDA\) allocating the residual stream: cudaError"):
        native().project_cuda(0, 0, 1, 4, 8, "float32", 0, 0, fake, 0, conditioning="film", shifts=fake)
