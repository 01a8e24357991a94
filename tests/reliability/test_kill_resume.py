"""Kill-and-resume: training SIGKILLed at 10 random moments, resumed every time with the same command.

The final weights and the metrics log must equal an uninterrupted run's bit for bit, and nothing
the kills interrupted may be left behind (temporaries, cut log lines). Every run passes --resume,
as a requeue script would, including the first one, killed before any checkpoint exists.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

DRIVER = Path(__file__).with_name("train_kill_driver.py")
STEPS, CHECKPOINT_EVERY = 6, 2


def kill_schedule(seed: int = 2026) -> list[tuple[str, int]]:
    """Ten kill points, each one reachable by the run that resumes after the previous kill.

    The generator follows where each resume restarts (the newest complete checkpoint), so every
    point is hit: the first before any checkpoint exists, the others in a seeded random order of
    checkpoint-write, rename, log-line and between-step kills, and one during the log rewrite a
    resume does once a checkpoint exists.
    """
    for attempt in range(seed, seed + 1000):  # the first seed whose walk stays inside the run's steps
        schedule = _walk(random.Random(attempt))
        if schedule is not None:
            return schedule
    raise AssertionError("no kill schedule fits the run")


def _walk(rng: random.Random) -> list[tuple[str, int]] | None:
    kinds = ["ckpt", "rename", "log", "log", "step", "ckpt", "rename", "step"]
    rng.shuffle(kinds)
    schedule, resumed_from = [("step", 1)], 0  # killed before any checkpoint exists
    for kind in kinds:
        later = range(resumed_from + 1, STEPS + 1)
        steps = [s for s in later if s % CHECKPOINT_EVERY == 0] if kind in ("ckpt", "rename") else list(later)
        if not steps:
            return None
        step = rng.choice(steps[:2])
        schedule.append((kind, step))
        if kind == "rename":  # the new checkpoint is in place
            resumed_from = step
        elif kind == "ckpt":  # killed writing it: the one before stands
            resumed_from = step - CHECKPOINT_EVERY
        else:  # between steps or mid log line: after the checkpoint of the last multiple of CHECKPOINT_EVERY
            resumed_from = step - step % CHECKPOINT_EVERY
        if resumed_from and not any(k == "trim" for k, _ in schedule):
            schedule.append(("trim", 0))  # the next resume rewrites the log: killed there
    return schedule


@pytest.fixture()
def driver():
    """The training driver as a fork server: each run is a fresh fork of one warmed-up process."""
    proc = subprocess.Popen([sys.executable, str(DRIVER), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def run(base, data, out, kind: str, step: int) -> int:
        proc.stdin.write(json.dumps({"args": [str(base), str(data), str(out), kind, str(step), "--resume"]}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the driver died:\n{proc.stderr.read()[-3000:]}")
        code = json.loads(line)["returncode"]
        if code not in (0, -signal.SIGKILL):
            raise AssertionError(f"{kind}@{step} exited {code}")
        return code

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from test_train import write_images

    return write_images(tmp_path_factory.mktemp("kill_data"), 3, "json")


@pytest.mark.slow  # a long end-to-end run (still run by .ci/run; -m 'not slow' skips it)
def test_training_survives_ten_kills_bit_identical(tiny_base_dir, data_dir, tmp_path, driver):
    run = driver
    schedule = kill_schedule()
    assert len(schedule) == 10 and {k for k, _ in schedule} >= {"ckpt", "log", "trim"}
    reference, cut = tmp_path / "reference", tmp_path / "cut"
    assert run(tiny_base_dir, data_dir, reference, "none", 0) == 0
    killed = [run(tiny_base_dir, data_dir, cut, kind, step) for kind, step in schedule]
    assert killed == [-signal.SIGKILL] * len(schedule)  # every kill point was reached
    assert run(tiny_base_dir, data_dir, cut, "none", 0) == 0

    for name in ("student_unet.safetensors", "student_full.safetensors"):
        want, got = load_file(reference / name), load_file(cut / name)
        assert want.keys() == got.keys()
        assert all(want[k].equal(got[k]) for k in want), name
    def records(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]  # timing differs

    assert [r["step"] for r in records(cut)] == list(range(1, STEPS + 1))
    assert records(cut) == records(reference)
    leftovers = [p for p in cut.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not leftovers
