"""The README opens with exactly the two set-up commands, and CI runs the second one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"\n((?:    \S.*\n)+)", text)
    assert first_block, "README.md must open with an indented block of set-up commands"
    return [line.strip() for line in first_block.group(1).splitlines()]


def test_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.startswith("pip install torch==2.13.0") and "cleandift-rt demo" in main_job
    assert tests.startswith('pip install torch==2.13.0 && pip install ".[dev]"') and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m 1 -E '^    pip install .*pytest' README.md" in ci
    assert 'bash -c "set -euo pipefail; $test_command"' in ci
    picked = [line[4:] for line in (ROOT / "README.md").read_text().splitlines()
              if re.match(r"^    pip install .*pytest", line)][0]
    assert picked == _setup_commands()[1]
