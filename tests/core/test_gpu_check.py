"""bench/gpu_check.py on a machine without a GPU: --dry-run lists every step and why it is skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dry run")
def test_dry_run_lists_every_step_and_why_it_is_skipped():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    steps = ("native", "tests", "match", "project", "torch", "trt")
    assert [line.split()[0] for line in lines[1:]] == list(steps)
    assert all("skipped: no CUDA device visible" in line for line in lines[1:])
