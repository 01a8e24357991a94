"""The resumable run loop itself (runs.loop.ResumableRun) on a toy run: a resumed run continues from
its checkpoint and ends where an uninterrupted one ends, a changed objective is refused, the metrics
log is cut back to the checkpoint's step, and the skip log counts and merges."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cleandift_rt.runs.checkpoints import list_checkpoints, restore_rng, rng_tensors
from cleandift_rt.runs.loop import ResumableRun
from cleandift_rt.runs.skips import SkipLog

CPU = torch.device("cpu")


@dataclass
class ToyConfig:
    steps: int = 6
    lr: float = 0.05
    seed: int = 0
    checkpoint_every: int = 2  # not part of the objective: changing it on resume is only noted


class Interrupted(Exception):
    pass


class ToyRun(ResumableRun):
    """A linear layer fitted on random batches drawn from torch's global generator (checkpointed)."""

    kind = "toy"
    checkpoint_format = "toy_checkpoint"
    objective_fields = ("lr", "seed")
    free_fields = ("steps",)

    def __init__(self, out, config: ToyConfig, resume=False, on_step=None, log=print):
        self.config = config
        self.open_run(out, resume=resume, keep_checkpoints=2, progress=False, log=log, on_step=on_step)
        torch.manual_seed(config.seed)
        self.model = nn.Linear(3, 1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.resume(resume)

    def train_step(self) -> dict:
        x = torch.randn(4, 3)
        loss = ((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": loss.item()}

    def validation(self):
        value = float(self.model.weight.detach().sum())
        return {"val": value}, f"step {self.step}: {value:.4f}"

    def checkpoint_state(self):
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **rng_tensors(CPU)}, {}

    def load_checkpoint_state(self, path, tensors, metadata):
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_rng(tensors, CPU)

    def run(self):
        return self.run_steps(self.config.steps, validate_every=3, checkpoint_every=self.config.checkpoint_every)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_continues_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path):
    full = ToyRun(tmp_path / "full", ToyConfig())
    full.run()

    def stop_after_three(step, record):
        if step == 3:  # after the step-2 checkpoint and one step that must be done again
            raise Interrupted

    with pytest.raises(Interrupted):
        ToyRun(tmp_path / "cut", ToyConfig(), on_step=stop_after_three).run()
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3]
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a line a kill cut short
    messages = []
    resumed = ToyRun(tmp_path / "cut", ToyConfig(), resume=True, log=messages.append)
    assert resumed.step == 2 and any("resumed from" in m and "step-0000002" in m for m in messages)
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2]  # step 3 and the cut line are gone
    resumed.run()

    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")  # the same losses and validations, bit for bit
    assert [r.get("val") is not None for r in metrics(tmp_path / "full")] == [False, False, True, False, False, True]
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == \
        ["step-0000004.safetensors", "step-0000006.safetensors"]


def test_a_changed_objective_is_refused_and_other_changes_are_noted(tmp_path):
    ToyRun(tmp_path, ToyConfig(steps=2)).run()
    with pytest.raises(ValueError, match=r"objective changed \(lr: 0.05 -> 0.1\)"):
        ToyRun(tmp_path, ToyConfig(steps=4, lr=0.1), resume=True)
    with pytest.raises(ValueError, match="already holds toy checkpoints"):
        ToyRun(tmp_path, ToyConfig(steps=4))
    messages = []
    run = ToyRun(tmp_path, ToyConfig(steps=4, checkpoint_every=1), resume=True, log=messages.append)
    assert run.step == 2
    assert any("changed settings (checkpoint_every: 2 -> 1)" in m for m in messages)
    assert not any("steps" in m for m in messages if "changed settings" in m)  # a free field


def test_resume_before_the_first_checkpoint_starts_at_step_zero_and_another_format_is_refused(tmp_path):
    messages = []
    assert ToyRun(tmp_path / "new", ToyConfig(), resume=True, log=messages.append).step == 0
    assert any("found no checkpoint" in m for m in messages)

    class OtherRun(ToyRun):
        checkpoint_format = "other_checkpoint"

    ToyRun(tmp_path / "toy", ToyConfig(steps=2)).run()
    with pytest.raises(ValueError, match="not a training checkpoint of this command"):
        OtherRun(tmp_path / "toy", ToyConfig(steps=2), resume=True)


def test_the_skip_log_counts_by_reason_keeps_a_few_examples_and_merges():
    images = SkipLog("image")
    for i in range(7):
        images.add("unreadable", f"img{i}.jpg")
    images.add("too small", "tiny.png")
    assert images.total == 8 and images.examples["unreadable"] == [f"img{i}.jpg" for i in range(5)]
    assert images.summary().startswith("8 images skipped: 1 too small (e.g. tiny.png); 7 unreadable")

    pairs = SkipLog("pair")
    pairs.add("image file missing", "a.jpg")
    pairs.drop("keypoint outside its image", 3, "pair-1")
    pairs.drop("keypoint outside its image", 0, "pair-2")  # nothing dropped: not counted
    assert pairs.pairs == {"image file missing": 1} and pairs.keypoints == {"keypoint outside its image": 3}
    assert pairs.lines() == ["skipped 1 pair(s): image file missing (e.g. a.jpg)",
                             "skipped 3 keypoint(s): keypoint outside its image (e.g. pair-1)"]

    merged = SkipLog.from_json(json.loads(json.dumps(images.to_json())), "image").merge(pairs)
    assert merged.counts == {"unreadable": 7, "too small": 1, "image file missing": 1}
    assert merged.dropped == {"keypoint outside its image": 3} and len(merged.examples["unreadable"]) == 5
