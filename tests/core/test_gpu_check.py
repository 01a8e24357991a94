"""bench/gpu_check.py on a machine without a GPU: --dry-run lists every step, every latency row and why
each is skipped; the latency table's arithmetic."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _latency_module():
    spec = importlib.util.spec_from_file_location("_gpu_latency", ROOT / "bench" / "_gpu_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dry run")
def test_dry_run_lists_every_step_every_latency_row_and_why_it_is_skipped():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    step_lines = [line for line in lines[1:] if not line.startswith("    ")]
    steps = ("native", "tests", "match", "project", "torch", "trt", "latency")
    assert [line.split()[0] for line in step_lines] == list(steps)
    assert all("skipped: no CUDA device visible" in line for line in step_lines)

    row_lines = [line.split()[:7] for line in lines if line.startswith("    ")]
    listed = {(path, int(size), taps, int(batch)) for path, size, _px, taps, _batch, batch, *_ in row_lines}
    wanted = {(path, size, taps, batch) for path in ("tensorrt", "tensorrt+graph", "torch_fp16", "ort_cuda")
              for size in (256, 512) for taps in ("us3+us6+us8", "all") for batch in (1, 2)}
    assert listed == wanted and len(row_lines) == len(wanted)
    rows = [line for line in lines if line.startswith("    ")]
    assert all("p50/p99 per frame: skipped: no CUDA device visible" in line for line in rows)
    if importlib.util.find_spec("tensorrt") is None:  # missing TensorRT is reported with how to get it
        assert all("TensorRT is not installed" in line and "bench/gpu_wheels.sh" in line
                   for line in rows if line.split()[0].startswith("tensorrt"))


def test_latency_statistics_are_per_frame():
    latency = _latency_module()
    seconds = [0.010] * 98 + [0.030, 0.050]
    row = latency.stats(seconds, batch=2)
    assert row["p50_ms"] == 10.0 and row["per_frame_p50_ms"] == 5.0 and row["frames_per_s"] == 200.0
    assert 30.0 < row["p99_ms"] < 50.0 and row["per_frame_p99_ms"] == round(row["p99_ms"] / 2, 2)
    assert row["calls"] == 100


def test_a_missing_cuda_blocks_every_latency_path_by_name():
    latency = _latency_module()
    blocked = latency.blockers("no CUDA device here")
    assert set(blocked) == set(latency.PATHS) and all(r.startswith("no CUDA device here") for r in blocked.values())
    groups = list(latency._groups())
    measured = [(r["path"], r["size"], r["taps"], r["batch"]) for _, rows, _ in groups for r in rows]
    assert sorted(measured) == sorted((r["path"], r["size"], r["taps"], r["batch"]) for r in latency.rows())
    assert len(measured) == len(set(measured))  # each row measured by exactly one group


def test_latency_groups_run_until_the_budget_and_a_failure_costs_only_its_rows(monkeypatch):
    import time

    latency = _latency_module()

    def measured(path):
        def measure(base, student, work, *group):
            return [{**r, **latency.stats([0.01] * 4, r["batch"])} for r in latency.rows() if r["path"] == path
                    and all(v in (r["size"], r["taps"]) for v in group)]
        return measure

    def broken(base, student, work, taps_name):
        raise RuntimeError("ONNX Runtime runs on ['CPUExecutionProvider']")

    monkeypatch.setattr(latency, "blockers", lambda cuda_missing: dict.fromkeys(latency.PATHS))
    monkeypatch.setattr(latency, "_random_sd21", lambda work: (None, None))
    monkeypatch.setattr(latency, "_torch_group", measured("torch_fp16"))
    monkeypatch.setattr(latency, "_ort_group", broken)
    said = []
    result = latency.run(said.append, deadline=time.perf_counter() + 100)  # room for all but TensorRT (~200 s)
    table = result["rows"]
    assert [(r["path"], r["size"], r["taps"], r["batch"]) for r in table] == [
        (r["path"], r["size"], r["taps"], r["batch"]) for r in latency.rows()]
    by_path = {p: [r for r in table if r["path"] == p] for p in latency.PATHS}
    assert all("per_frame_p99_ms" in r for r in by_path["torch_fp16"])
    assert all("CPUExecutionProvider" in r["error"] for r in by_path["ort_cuda"])
    assert all(r["skipped"].startswith("time budget") and "--budget 1500" in r["skipped"]
               for r in by_path["tensorrt"] + by_path["tensorrt+graph"])
    assert any("FAILED" in line for line in said)
    lines = latency.format_table(result)
    assert len(lines) == len(table) and "per frame p50" in lines[0] and "FAILED" in lines[8]
