"""The README opens with exactly the two set-up commands, CI runs the second one, and the docs stand alone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

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


# the notes and the specification the project started from are not in the repository: citing them
# would send a reader to a document they do not have (the facts live in docs/method.md and docs/*.md)
OUTSIDE_DOCUMENTS = re.compile(r"FIELD-NOTES|SPEC\.md|\bSPEC (?:section|\u00a7)|shared/papers")


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".md", ".py", ".toml", ".txt", ".cpp", ".h", ".cu", ".cuh", ".cfg", ".yaml", ".yml"}
    return [ROOT / name for name in listed.splitlines() if Path(name).suffix in suffixes and (ROOT / name).is_file()]


def test_nothing_cites_documents_outside_the_repository():
    me = Path(__file__).resolve()
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}"
            for path in _tracked_text_files() if path != me
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if OUTSIDE_DOCUMENTS.search(line)]
    assert not hits, "cite the repository's own docs instead:\n" + "\n".join(hits)


def test_documentation_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # markdown links
            if not re.match(r"[a-z]+://|mailto:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
        for target in set(re.findall(r"(?<![\w/.])(docs/[\w-]+\.md)", text)):  # "docs/x.md" named in text
            if not (ROOT / target).exists():
                broken.append(f"{page.relative_to(ROOT)} names {target}")
    assert not broken, "\n".join(broken)
