"""The CI-sized fuzz run: atheris over every file reader (bench/fuzz.py, in a subprocess: Fuzz() never returns)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_file_reader_survives_the_ci_sized_fuzz_run(tmp_path):
    pytest.importorskip("atheris", reason="atheris is part of the [dev] extra (x86-64 Linux, Python <= 3.12)")
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--runs", "3000", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and not result["findings"], result.get("log_tail") or proc.stderr[-3000:]
    assert result["total_executions"] >= 2900
    assert set(result["executions"]) == {"student", "onnx", "plan", "spair", "pairs_json", "pf_csv", "image", "config",
                                         "aggregator", "manifest"}
    assert all(n > 0 for n in result["executions"].values()) and result["coverage_edges"] > 100
