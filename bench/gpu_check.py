"""The prepared GPU check: build, CUDA parity tests, kernel timings, the PyTorch backend on CUDA, TensorRT, latency.

    python bench/gpu_check.py [--dry-run] [--out FILE.json] [--only STEP ...] [--budget SECONDS]

Run once on a CUDA machine (under 5 minutes on an H100/H200-class GPU: ``--budget``, default 300 s, is
the deadline the latency step plans against). Steps, each skipped with one line when what it needs is
missing:

 1. native   the extension's CUDA kernels: rebuilt with nvcc (`pip install --no-deps
             --no-build-isolation .`, CLEANDIFT_CUDA=ON, archs of this GPU) when the install has none;
 2. tests    `pytest -m cuda tests/kernels/test_cuda.py`: match and project against PyTorch, every dtype,
             partial tiles, ties, zero vectors, N*M > 2^31, side streams;
 3. match    N = M in {2304, 9216}, C in {640, 1280}, batch 1 and 8, fp16/bf16: ours vs torch's
             normalize + matmul + argmax, and the fraction of this GPU's measured fp16 GEMM rate;
 4. project  the fused head vs the PyTorch head, D = 1280, 48 x 48, batch 1 and 8, fp16;
 5. torch    the PyTorch backend's path on CUDA (ReferenceExtractor under fp16 autocast, as
             Engine(..., precision="fp16") runs it) with SD2.1-size random weights at 512 and 768 px,
             tap us6 and all taps: latency, images/s, peak memory;
 6. trt      where TensorRT is installed: tiny model -> fp16 ONNX -> plan (built and verified) ->
             Engine(plan).extract; where onnxruntime-gpu is: its providers and a CUDA-provider run;
             TensorRT's absence is reported with how to carry its wheels, never a crash;
 7. latency  the real-time table (bench/_gpu_latency.py): 256 and 512 px, taps us3+us6+us8 and all,
             batch 1 and 2, p50 / p99 per frame for the TensorRT plan with and without CUDA graphs,
             the PyTorch fp16 path and ONNX Runtime's CUDA provider, SD 2.1 size; groups that do not
             fit the time left are listed as skipped (``--dry-run`` lists every row).

One JSON result (GPU, driver, versions, every step) goes to --out (default
bench/results/gpu_check-*.json). ``--dry-run`` lists what would run and what would be skipped, on
any machine. What the script needs installs with the README's GPU recipe; on a bare machine carry
diffusers (and, to build, scikit-build-core, pybind11, cmake, ninja) as wheels: bench/gpu_wheels.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _gpu_latency

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STEPS = ("native", "tests", "match", "project", "torch", "trt", "latency")
DEFAULT_BUDGET_S = 300


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_ready() -> tuple[bool, str]:
    if not have("torch"):
        return False, "PyTorch is not installed"
    import torch

    if not torch.cuda.is_available():
        return False, f"no CUDA device visible to PyTorch {torch.__version__}"
    return True, torch.cuda.get_device_name()


def plan(args) -> dict[str, str | None]:
    """{step: None (runs) or the reason it is skipped}."""
    ok, why = cuda_ready()
    skip = {}
    for step in STEPS:
        skip[step] = None if ok else why
    if ok and not have("cleandift_rt"):
        skip.update({s: "cleandift_rt is not installed (pip install --no-deps --no-build-isolation .)" for s in STEPS})
    if not have("pytest"):
        skip["tests"] = skip["tests"] or "pytest is not installed"
    if not have("diffusers"):
        skip["torch"] = skip["torch"] or "diffusers is not installed (carry its wheel: bench/gpu_wheels.sh)"
    if not (have("tensorrt") or have("onnxruntime")):
        skip["trt"] = skip["trt"] or (f"neither onnxruntime-gpu nor TensorRT is installed "
                                      f"({_gpu_latency.TENSORRT_MISSING})")
    if not have("diffusers"):
        skip["trt"] = skip["trt"] or "diffusers is needed to build the tiny model"
    if ok and all(_gpu_latency.blockers(None).values()):
        skip["latency"] = "no latency row can run here (--dry-run lists each row and why)"
    return skip


# -- timing helpers -----------------------------------------------------------------------------


def cuda_time(fn, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` on the current stream (CUDA events)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return sorted(times)[len(times) // 2]


def gemm_rate(dtype) -> float:
    """This GPU's measured dense matmul rate in FLOP/s (8192^3)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192**3 / cuda_time(lambda: a @ b, repeat=10)


# -- the steps ------------------------------------------------------------------------------------


def step_native(log) -> dict:
    import cleandift_rt

    info = cleandift_rt.build_info()
    if info["cuda_compiled"] and info["cuda_devices"]:
        return {"rebuilt": False, "cuda_archs": info["cuda_archs"], "cuda_status": info["cuda_status"]}
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, CLEANDIFT_CUDA="ON", CLEANDIFT_CUDA_ARCHS=f"{major}{minor}")
    log(f"native: building the CUDA kernels for sm_{major}{minor} (no CUDA kernels in this install)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError("the CUDA build failed:\n" + (proc.stdout + proc.stderr)[-3000:])
    probe = subprocess.run([sys.executable, "-c", "import json, cleandift_rt; print(json.dumps(cleandift_rt.build_info()))"],
                           cwd="/", capture_output=True, text=True, check=True)
    info = json.loads(probe.stdout)
    if not info["cuda_devices"]:
        raise RuntimeError(f"rebuilt, but the module sees no device: {info['cuda_status']}")
    return {"rebuilt": True, "build_seconds": round(time.perf_counter() - t0, 1), "cuda_archs": info["cuda_archs"],
            "cuda_status": info["cuda_status"]}


def step_tests(log) -> dict:
    out = Path(tempfile.mkdtemp()) / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={out}", "tests/kernels/test_cuda.py"], cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
    import xml.etree.ElementTree as ET

    suite = ET.parse(out).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
              or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"], **counts,
            "failed": failed, "summary": tail[0] if tail else "", "ok": proc.returncode == 0}


def step_match(log) -> dict:
    import torch
    import torch.nn.functional as F

    from cleandift_rt import match

    rows = []
    peak = {torch.float16: gemm_rate(torch.float16), torch.bfloat16: gemm_rate(torch.bfloat16)}
    for dtype in (torch.float16, torch.bfloat16):
        for n in (2304, 9216):
            for c in (640, 1280):
                for batch in (1, 8):
                    src = torch.randn(batch, n, c, device="cuda", dtype=dtype)
                    dst = torch.randn(batch, n, c, device="cuda", dtype=dtype)

                    def torch_match(src=src, dst=dst):
                        sims = F.normalize(src, dim=-1) @ F.normalize(dst, dim=-1).transpose(1, 2)
                        return sims.argmax(-1)

                    ours = cuda_time(lambda src=src, dst=dst: match(src, dst), repeat=5)
                    ref = cuda_time(torch_match, repeat=5)
                    flops = 2 * batch * n * n * c
                    rows.append({"dtype": str(dtype).split(".")[-1], "n": n, "c": c, "batch": batch,
                                 "ours_ms": round(ours * 1e3, 3), "torch_ms": round(ref * 1e3, 3),
                                 "speedup_vs_torch": round(ref / ours, 3),
                                 "fraction_of_gemm_rate": round(flops / ours / peak[dtype], 3)})
    return {"gemm_tflops": {str(k).split(".")[-1]: round(v / 1e12, 1) for k, v in peak.items()}, "rows": rows}


def step_project(log) -> dict:
    import torch

    from cleandift_rt import project
    from cleandift_rt.models.heads import ProjectionHeads

    torch.manual_seed(0)
    heads = ProjectionHeads({"us6": 1280}).cuda().eval()
    rows = []
    for batch in (1, 8):
        feats = torch.randn(batch, 1280, 48, 48, device="cuda", dtype=torch.float16)
        ours = cuda_time(lambda: project(feats, 500, heads, "us6"))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            ref = cuda_time(lambda: heads("us6", feats, 500))
        want = heads("us6", feats.float(), 500)
        got = project(feats, 500, heads, "us6").float()
        rows.append({"batch": batch, "ours_ms": round(ours * 1e3, 3), "pytorch_autocast_ms": round(ref * 1e3, 3),
                     "speedup": round(ref / ours, 3),
                     "relative_error": float((got - want).norm() / want.norm())})
    return {"d": 1280, "hw": [48, 48], "rows": rows}


def step_torch(log) -> dict:
    import torch

    from cleandift_rt.features.extractor import ReferenceExtractor
    from cleandift_rt.models import BaseModel, Student, build_models, schedule_alphas_cumprod
    from cleandift_rt.models import configs
    from cleandift_rt.taps import TAPS

    with torch.device("cuda"):
        unet, vae, _ = build_models("sd21", seed=0)
    base = BaseModel(unet=unet.eval(), vae=vae.eval(), text_encoder=None, tokenizer=None,
                     alphas_cumprod=schedule_alphas_cumprod(configs.SCHEDULER), source="random-sd21", variant="sd21")
    student = Student(unet=unet, timestep=261.0, source="random-sd21")
    rows = []
    for size in (512, 768):
        ref = ReferenceExtractor(student, base, size=size, device="cuda")
        embeds = torch.zeros(1, 77, 1024, device="cuda")
        for taps in (["us6"], list(TAPS)):
            for batch in (1, 4):
                images = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
                torch.cuda.reset_peak_memory_stats()

                def run():
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                        return ref.extract(images, taps=taps, prompt_embeds=embeds[0])

                seconds = cuda_time(run, repeat=5, warmup=1)
                out = run()
                rows.append({"size": size, "taps": "us6" if len(taps) == 1 else "all", "batch": batch,
                             "latency_ms": round(seconds * 1e3, 1), "images_per_s": round(batch / seconds, 2),
                             "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                             "finite": bool(all(torch.isfinite(f).all() for f in out.values()))})
    return {"weights": "SD2.1-size random (fp32 weights, fp16 autocast)", "rows": rows}


def step_trt(log) -> dict:
    import torch

    from cleandift_rt import Engine
    from cleandift_rt.assets import load_photo
    from cleandift_rt.export.onnx_export import export_onnx
    from cleandift_rt.models import load_base, save_student_unet, write_tiny_base

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    base_dir = write_tiny_base(work / "base")
    base = load_base(base_dir)
    save_student_unet(work / "student.safetensors", base.unet)
    export_onnx(work / "student.safetensors", base, work / "tiny.onnx", size=(256, 256), batch="1:2:4",
                precision="fp16", log=lambda *_: None)
    photos = [load_photo(p) for p in ("cat", "coffee")]
    result: dict = {}
    if have("onnxruntime"):
        import onnxruntime

        result["onnxruntime_providers"] = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" in result["onnxruntime_providers"]:
            engine = Engine(work / "tiny.onnx", device="cuda")
            engine.extract(photos)
            result["onnxruntime_gpu"] = {"providers_in_use": engine.info["providers"]}
    if not have("tensorrt"):
        result["tensorrt"] = {"skipped": _gpu_latency.TENSORRT_MISSING}
    else:
        from cleandift_rt.export.trt_build import build_engine

        summary = build_engine(work / "tiny.onnx", work / "tiny.plan", timing_cache=work / "tiny.cache", log=log)
        engine = Engine(work / "tiny.plan")
        feats = engine.extract(photos)
        seconds = cuda_time(lambda: engine.extract(photos), repeat=5)
        from cleandift_rt.formats.plan import read_plan_header

        header = read_plan_header(work / "tiny.plan")[0]
        result["tensorrt"] = {"version": header["tensorrt"], "build": summary, "verified_cosine": header.get(
            "verified_cosine"), "extract_ms_batch2": round(seconds * 1e3, 2),
            "finite": bool(all(torch.isfinite(torch.as_tensor(f)).all() for f in feats.values()))}
    shutil.rmtree(work, ignore_errors=True)
    return result


def machine() -> dict:
    d = {"python": platform.python_version(), "host": platform.node()}
    if have("torch"):
        import torch

        d["torch"] = torch.__version__
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            d.update(gpu=props.name, capability=list(torch.cuda.get_device_capability()),
                     memory_gib=round(props.total_memory / 2**30, 1), torch_cuda=torch.version.cuda)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        d["driver"] = smi.stdout.strip()
    return d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and what would be skipped; run nothing")
    parser.add_argument("--out", metavar="FILE.json", help="result file (default bench/results/gpu_check-*.json)")
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help="the whole check's time budget; latency groups that no longer fit are skipped "
                             f"(default {DEFAULT_BUDGET_S})")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    skip = plan(args)
    steps = [s for s in STEPS if not args.only or s in args.only]
    if args.dry_run:
        ok, why = cuda_ready()
        print(f"gpu_check on {platform.node()}: {why}")
        for step in steps:
            print(f"  {step:<8} {'would run' if skip[step] is None else 'skipped: ' + skip[step]}")
            if step == "latency":  # the table's rows, each with what keeps it from running here
                blocked = _gpu_latency.blockers(None if ok else why)
                for row in _gpu_latency.rows():
                    reason = blocked[row["path"]]
                    print(f"    {_gpu_latency.label(row)}  p50/p99 per frame: "
                          f"{'would run (budget permitting)' if reason is None else 'skipped: ' + reason}")
        return 0

    def log(msg):
        print(msg, flush=True)

    t_all = time.perf_counter()
    result = {"script": "bench/gpu_check.py", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
              "steps": {}}
    deadline = t_all + args.budget
    functions = {"native": step_native, "tests": step_tests, "match": step_match, "project": step_project,
                 "torch": step_torch, "trt": step_trt, "latency": lambda log: _gpu_latency.run(log, deadline)}
    for step in steps:
        if skip[step] is not None:
            log(f"{step}: skipped ({skip[step]})")
            result["steps"][step] = {"skipped": skip[step]}
            continue
        t0 = time.perf_counter()
        try:
            out = functions[step](log)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"{step}: done in {out['seconds']} s: {json.dumps(out)[:400]}")
            if step == "latency":
                for line in _gpu_latency.format_table(out):
                    log(line)
        except Exception as exc:  # one failing step must not cost the others' numbers
            out = {"error": f"{type(exc).__name__}: {exc}"[:2000], "seconds": round(time.perf_counter() - t0, 1)}
            log(f"{step}: FAILED: {out['error'][:400]}")
        result["steps"][step] = out
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out) if args.out else RESULTS / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"gpu_check: {result['seconds']} s; {out}")
    failed = [s for s, r in result["steps"].items() if "error" in r or (s == "tests" and not r.get("ok", True))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
