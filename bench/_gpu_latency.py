"""The real-time latency table of ``bench/gpu_check.py`` (its ``latency`` step): p50 / p99 per frame on a GPU.

Rows: 256 and 512 px x taps us3+us6+us8 (what a Robot-DIFT-style controller reads) and all taps x
batch 1 and 2 (one camera, two), for four paths:

  torch_fp16      the PyTorch backend's path under fp16 autocast (``ReferenceExtractor.features``), as
                  ``Engine(student, precision="fp16")`` runs it
  ort_cuda        the fp32 export on ONNX Runtime's CUDA provider alone, IO-bound to GPU tensors (the
                  Engine itself prefers ORT's TensorRT provider where that loads)
  tensorrt        the strongly typed fp16 plan of a fixed-size export (``export_onnx(precision="fp16")``
                  -> ``build_engine``), through the TensorRT backend
  tensorrt+graph  the same plan with ``cuda_graph=True``: captured once per shape, then replayed

An SD 2.1-size VAE encoder and U-Net with random weights (the latency does not depend on the values)
and the "" prompt. Each call is timed with the pixels already on the GPU, so image decoding and host
copies are not in it: synchronise, call, synchronise; ``WARMUP`` calls first (cuDNN's algorithm search,
graph capture), then ``ITERATIONS``. p99 of 50 calls interpolates between the two slowest; per frame is
per call / batch.

Budget: at this size the exports run minutes on the CPU and each TensorRT build minutes on the GPU, so
a group of rows starts only while its rough cost on an H100 (``ESTIMATE_S``) fits before the deadline
``gpu_check`` passes; what does not fit is listed as skipped with the reason, and ``python
bench/gpu_check.py --only latency --budget 1500`` measures every row. The project has no int8 or
fast-encoder path, so the table has no such rows.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

SIZES = (256, 512)
TAP_SETS = {"us3+us6+us8": ("us3", "us6", "us8"), "all": None}  # None: every tap of the table
BATCHES = (1, 2)
PATHS = ("torch_fp16", "ort_cuda", "tensorrt", "tensorrt+graph")
WARMUP, ITERATIONS = 5, 50
ESTIMATE_S = {"torch_fp16": 30, "ort_cuda": 75, "tensorrt": 200}  # one group of rows, SD 2.1 size, H100
TENSORRT_MISSING = (
    "TensorRT is not installed: pip install 'tensorrt>=10.12,<12' (the cuda major of torch picks tensorrt-cu12 or "
    "-cu13); without internet, `pip download --no-deps --extra-index-url https://pypi.nvidia.com tensorrt-cuNN "
    "tensorrt-cuNN-libs tensorrt-cuNN-bindings` where that index is reachable (the libs wheel holds libnvinfer and "
    "is large) and carry the wheels as bench/gpu_wheels.sh carries its own")


def rows() -> list[dict]:
    """Every row of the table, in the order they are listed and measured."""
    return [{"path": p, "size": s, "taps": t, "batch": b} for p in PATHS for s in SIZES for t in TAP_SETS
            for b in BATCHES]


def label(row: dict) -> str:
    return f"{row['path']:<14} {row['size']} px  {row['taps']:<11} batch {row['batch']}"


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ort_cuda_missing() -> str | None:
    if not _have("onnxruntime"):
        return "onnxruntime-gpu is not installed"
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return f"this onnxruntime build offers {providers}: install onnxruntime-gpu (it replaces onnxruntime)"
    return None


def blockers(cuda_missing: str | None) -> dict[str, str | None]:
    """{path: None when it can run here, else every reason it cannot, joined}."""
    out = {}
    for path in PATHS:
        reasons = [cuda_missing] if cuda_missing else []
        if not _have("diffusers"):
            reasons.append("diffusers is not installed (carry its wheel: bench/gpu_wheels.sh)")
        if path != "torch_fp16" and not _have("onnx"):
            reasons.append("onnx is not installed")
        if path == "ort_cuda":
            reasons.append(_ort_cuda_missing())
        if path.startswith("tensorrt") and not _have("tensorrt"):
            reasons.append(TENSORRT_MISSING)
        out[path] = "; ".join(r for r in reasons if r) or None
    return out


def stats(seconds: list[float], batch: int) -> dict:
    """p50 / p99 per call and per frame (milliseconds), frames per second at the median."""
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "per_frame_p50_ms": round(p50 / batch, 2),
            "per_frame_p99_ms": round(p99 / batch, 2), "frames_per_s": round(batch * 1e3 / p50, 1),
            "calls": len(seconds)}


def time_calls(fn) -> list[float]:
    import torch

    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(ITERATIONS):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds


def _pixels(batch: int, size: int):
    import torch

    return (torch.rand(batch, 3, size, size, device="cuda") * 2 - 1).contiguous()


def _tap_list(taps):
    from cleandift_rt.taps import TAPS

    return list(taps) if taps is not None else list(TAPS)


# -- the groups of rows ------------------------------------------------------------------------------


def _random_sd21(work: Path):
    import torch

    from cleandift_rt.models import BaseModel, Student, build_models, build_tiny_tokenizer, schedule_alphas_cumprod
    from cleandift_rt.models import configs

    with torch.device("cuda"):
        unet, vae, text_encoder = build_models("sd21", seed=0)
    base = BaseModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                     tokenizer=build_tiny_tokenizer(work / "tokenizer", pad_token="!"),
                     alphas_cumprod=schedule_alphas_cumprod(configs.SCHEDULER), source="random-sd21", variant="sd21")
    return base, Student(unet=unet, timestep=261.0, source="random-sd21")


def _torch_group(base, student, work: Path) -> list[dict]:
    import torch

    from cleandift_rt.features.extractor import ReferenceExtractor

    out = []
    for size in SIZES:
        ref = ReferenceExtractor(student, base, size=size, device="cuda")
        for taps_name, taps in TAP_SETS.items():
            for batch in BATCHES:
                pixels, wanted = _pixels(batch, size), _tap_list(taps)

                def call(pixels=pixels, wanted=wanted):
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                        ref.features(pixels, None, wanted)

                out.append({"path": "torch_fp16", "size": size, "taps": taps_name, "batch": batch,
                            **stats(time_calls(call), batch)})
    return out


def _ort_group(base, student, work: Path, taps_name: str) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    from cleandift_rt.export.onnx_export import export_onnx

    path = work / f"ort-{taps_name}.onnx"
    export_onnx(student, base, path, dynamic_size=(min(SIZES), max(SIZES)), taps=TAP_SETS[taps_name],
                log=lambda *_: None)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                                                   "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":  # ORT falls back to the CPU silently
        raise RuntimeError(f"ONNX Runtime runs on {session.get_providers()}, not its CUDA provider (CUDA libraries?)")
    out = []
    for size in SIZES:
        for batch in BATCHES:
            pixels = _pixels(batch, size)
            binding = session.io_binding()
            binding.bind_input("images", "cuda", 0, np.float32, list(pixels.shape), pixels.data_ptr())
            for output in session.get_outputs():
                binding.bind_output(output.name, "cuda")  # left on the GPU, as the Engine's binding does
            out.append({"path": "ort_cuda", "size": size, "taps": taps_name, "batch": batch,
                        **stats(time_calls(lambda binding=binding: session.run_with_iobinding(binding)), batch)})
    del session
    return out


def _tensorrt_group(base, student, work: Path, size: int, taps_name: str) -> list[dict]:
    from cleandift_rt import Engine
    from cleandift_rt.export.mixed_precision import PrecisionPolicy
    from cleandift_rt.export.onnx_export import export_onnx
    from cleandift_rt.export.trt_build import build_engine

    folder = work / f"trt-{size}-{taps_name}"
    folder.mkdir()
    graph, plan = folder / "model.onnx", work / f"trt-{size}-{taps_name}.plan"
    # no range calibration (minutes of ONNX Runtime on the CPU at this size): the islands do not change the speed
    export_onnx(student, base, graph, size=(size, size), taps=TAP_SETS[taps_name], batch="1:2:2", precision="fp16",
                policy=PrecisionPolicy(max_abs=None), log=lambda *_: None)
    build_engine(graph, plan, batch="1:2:2", timing_cache=work / "latency.cache", verify=False, log=lambda *_: None)
    shutil.rmtree(folder)
    out = []
    for path, cuda_graph in (("tensorrt", False), ("tensorrt+graph", True)):
        backend = Engine(plan, cuda_graph=cuda_graph).backend
        wanted = list(backend.info.tap_names)
        for batch in BATCHES:
            pixels = _pixels(batch, size)
            seconds = time_calls(lambda pixels=pixels: backend.run(pixels, None, wanted))
            out.append({"path": path, "size": size, "taps": taps_name, "batch": batch, **stats(seconds, batch)})
        del backend
    plan.unlink()
    return out


def _groups():
    """(estimate key, rows it measures, function of (base, student, work)) in the order they run."""
    def of(path, size=None, taps=None):
        return [r for r in rows() if r["path"] == path and size in (None, r["size"]) and taps in (None, r["taps"])]

    yield "torch_fp16", of("torch_fp16"), _torch_group
    for taps_name in TAP_SETS:
        yield "ort_cuda", of("ort_cuda", taps=taps_name), lambda b, s, w, t=taps_name: _ort_group(b, s, w, t)
    for taps_name in TAP_SETS:  # the robotics taps first, at both sizes
        for size in SIZES:
            measured = of("tensorrt", size, taps_name) + of("tensorrt+graph", size, taps_name)
            yield "tensorrt", measured, lambda b, s, w, z=size, t=taps_name: _tensorrt_group(b, s, w, z, t)


def run(log, deadline: float) -> dict:
    """Measure every row that can run here before ``deadline`` (``time.perf_counter()`` seconds)."""
    import torch

    blocked = blockers(None)
    table: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="gpu-latency-"))
    try:
        base, student = _random_sd21(work)
        for kind, measured, measure in _groups():
            reason = blocked[measured[0]["path"]]
            left = deadline - time.perf_counter()
            if reason is None and left < ESTIMATE_S[kind]:
                reason = (f"time budget: {left:.0f} s left, this group takes ~{ESTIMATE_S[kind]} s on an H100 "
                          "(python bench/gpu_check.py --only latency --budget 1500 measures every row)")
            if reason is not None:
                table += [{**r, "skipped": reason} for r in measured]
                continue
            t0 = time.perf_counter()
            try:
                table += measure(base, student, work)
                log(f"latency: {len(measured)} {kind} rows in {time.perf_counter() - t0:.0f} s")
            except Exception as exc:  # one failing group must not cost the others' numbers
                error = f"{type(exc).__name__}: {exc}"[:1000]
                log(f"latency: {kind} FAILED: {error[:300]}")
                table += [{**r, "error": error} for r in measured]
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    order = {(r["path"], r["size"], r["taps"], r["batch"]): i for i, r in enumerate(rows())}
    table.sort(key=lambda r: order[(r["path"], r["size"], r["taps"], r["batch"])])
    return {"model": "SD 2.1-size VAE encoder + U-Net, random weights, \"\" prompt; pixels on the GPU",
            "warmup": WARMUP, "iterations": ITERATIONS, "rows": table}


def format_table(result: dict) -> list[str]:
    """The rows as text lines (what gpu_check prints after the step)."""
    lines = []
    for r in result["rows"]:
        if "p50_ms" in r:
            lines.append(f"  {label(r)}  per frame p50 {r['per_frame_p50_ms']:8.2f} ms  "
                         f"p99 {r['per_frame_p99_ms']:8.2f} ms  ({r['frames_per_s']} frames/s)")
        else:
            status = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error']}"
            lines.append(f"  {label(r)}  {status}"[:240])
    return lines
