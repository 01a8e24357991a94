"""build_info(): what the installation reports about itself."""

from __future__ import annotations

import os
import shutil

import cleandift_rt


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_build_info_fields():
    info = cleandift_rt.build_info()
    assert info["native"] is True, info.get("native_error")
    assert isinstance(info["cuda_compiled"], bool)
    assert info["compiler"] and isinstance(info["simd"], list)
    assert cleandift_rt.__version__ == info["package_version"]
    assert 128 << 10 <= info["l2_cache_bytes"] <= 64 << 20
    assert info["onnxruntime"]["available"] and "CPUExecutionProvider" in info["onnxruntime"]["providers"]
    assert "tensorrt" in info and "available" in info["tensorrt"]
    text = cleandift_rt.format_build_info(info)
    assert "CUDA kernels" in text and "onnxruntime" in text


def test_simd_found_at_run_time_matches_the_cpu():
    flags = _cpu_flags()
    if not flags:
        return  # not Linux/x86: nothing to compare with
    simd = set(cleandift_rt.build_info()["simd"])
    assert ("avx2" in simd) == ("avx2" in flags and "fma" in flags)
    assert ("avx512" in simd) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert ("amx_bf16" in simd) <= ("amx_bf16" in flags)


def test_cpu_kernels_and_why_not_amx():
    info = cleandift_rt.build_info()
    simd = set(info["simd"])
    assert info["match_cpu_kernel"] in ("avx512", "avx2", "portable")
    assert info["cpu_kernel_bf16"] == ("amx" if "amx_bf16" in simd else "avx512_bf16" if "avx512_bf16" in simd
                                       else None)
    assert (info["amx_unavailable"] is None) == ("amx_bf16" in simd)
    flags = _cpu_flags()
    if flags and not {"amx_bf16", "amx_tile"} <= flags:
        assert "the CPU has no AMX-BF16 / AMX-TILE" in info["amx_unavailable"]
    line = next(x for x in cleandift_rt.format_build_info(info).splitlines() if "CPU kernels" in x)
    assert f"fp32 {info['match_cpu_kernel']}" in line and (info["amx_unavailable"] or "") in line


def test_cuda_compiled_where_nvcc_was_present():
    # .ci/run sets CLEANDIFT_EXPECT_CUDA=1 when it builds with nvcc: a silently CPU-only build fails here.
    info = cleandift_rt.build_info()
    if os.environ.get("CLEANDIFT_EXPECT_CUDA") == "1":
        assert info["cuda_compiled"], info["cuda_status"]
        assert info["cuda_archs"]
    if info["cuda_compiled"] and not info["cuda_devices"]:
        assert info["cuda_status"]  # says why no device is usable (no driver here)
    if not shutil.which("nvcc") and os.environ.get("CLEANDIFT_CUDA", "").upper() == "OFF":
        assert not info["cuda_compiled"]


def test_an_old_driver_is_named_with_the_branch_to_install():
    from cleandift_rt.build_info import cuda_driver_status

    base = {"cuda_toolkit": "13.0.48", "cuda_status": "cudaErrorInsufficientDriver: CUDA driver version is "
            "insufficient for CUDA runtime version"}
    old = cuda_driver_status({**base, "cuda_driver_version": 12040})
    assert "supports CUDA 12.4" in old and "needs an NVIDIA driver R580 or newer" in old
    assert "no NVIDIA driver found" in cuda_driver_status({**base, "cuda_driver_version": 0})
    assert cuda_driver_status({**base, "cuda_driver_version": 13000, "cuda_status": "ok"}) == "ok"
    assert "R525" in cuda_driver_status({**base, "cuda_toolkit": "12.6", "cuda_driver_version": 11080})
    info = cleandift_rt.build_info()
    if info["cuda_compiled"] and not info["cuda_devices"]:  # this machine: CUDA build, no driver
        assert "R580" in info["cuda_status"] or "R525" in info["cuda_status"]
    assert info["onnxruntime"]["distribution"] in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-gpu + onnxruntime")
