"""Issue 29, class 5: a resume continues the same run, and "exact" says under which settings.

``train.py --resume`` refuses a checkpoint made from another base model (the base's weight
fingerprint is part of the objective check of the run loop); ``eval-pairs`` into the same ``--out``
checks a journaled skip again instead of replaying it; ``deterministic=true`` sets what PyTorch
needs for bit-identical runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift_rt.cli.train import entry as train_entry
from cleandift_rt.evaluation.pairs import load_pairs_json
from cleandift_rt.evaluation.runner import evaluate
from cleandift_rt.models import write_tiny_base
from cleandift_rt.training import Trainer, build_config

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = dict(batch_size=2, size=64, validate_every=0, checkpoint_every=1, lr=1e-4, warmup_steps=1)


def _pattern(i: int, size=(80, 96)) -> Image.Image:
    y, x = np.mgrid[0:size[0], 0:size[1]]
    rgb = np.stack([(x * (i + 2)) % 256, (y * (3 + 2 * i)) % 256, ((x + y) * (i + 1)) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(4):
        _pattern(i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"pattern {i}")
    return folder


def test_a_run_is_never_continued_from_another_base_model(tiny_base_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--batch-size", "2", "--size", "64", "--no-progress",
              "validate_every=0", "checkpoint_every=1", "warmup_steps=1"]
    assert train_entry(["--base", str(tiny_base_dir), "--steps", "1", *common]) == 0
    other = write_tiny_base(tmp_path / "other_base", seed=7)  # the same architecture, other weights
    capsys.readouterr()
    assert train_entry(["--base", str(other), "--steps", "2", "--resume", *common]) == 2
    err = capsys.readouterr().err
    assert "its objective changed (the base model" in err and "Traceback" not in err
    assert train_entry(["--base", str(tiny_base_dir), "--steps", "2", "--resume", *common]) == 0  # its own base


def test_deterministic_runs_are_bit_identical_and_set_what_pytorch_needs(tiny_base, data, tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        torch.set_num_threads(2)
        finals = []
        for run in range(2):
            config = build_config(overrides=dict(STEPS, steps=3, deterministic=True))
            trainer = Trainer(config, tiny_base, data, tmp_path / f"run{run}", progress=False, log=lambda _: None)
            assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            trainer.run()
            finals.append({n: p.detach().clone() for n, p in trainer.named_params})
        assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


class ColourGrid:
    """A feature source without a model: the image's colours on a 16 x 16 grid plus a position ramp."""

    name, key = "colour", "colour-grid-v1"

    def features(self, image, category: str = "") -> torch.Tensor:
        colours = torch.from_numpy(np.asarray(image.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1) / 255
        ramp = torch.linspace(0, 1, 16)
        return torch.cat([colours, ramp[None, None, :].expand(1, 16, 16), ramp[None, :, None].expand(1, 16, 16)])

    def describe(self) -> dict:
        return {"method": self.name}


def test_a_journaled_skip_is_checked_again_when_the_image_arrives(tmp_path):
    _pattern(1).save(tmp_path / "a.png")
    doc = [{"source": "a.png", "target": "b.png", "source_points": [[10, 20], [40, 30]],
            "target_points": [[12, 21], [41, 33]], "id": "p0"}]
    (tmp_path / "pairs.json").write_text(json.dumps(doc))
    journal = tmp_path / "out" / "journal.jsonl"
    pairs, _ = load_pairs_json(tmp_path / "pairs.json")
    first = evaluate(pairs, ColourGrid(), journal=journal, progress=False)
    assert not first.results and first.skips.counts == {"image file missing": 1}
    _pattern(1).save(tmp_path / "b.png")  # the missing image is added; the same --out is run again
    pairs, _ = load_pairs_json(tmp_path / "pairs.json")
    second = evaluate(pairs, ColourGrid(), journal=journal, progress=False)
    assert len(second.results) == 1 and not second.skips.counts and second.resumed_pairs == 0
    third = evaluate(pairs, ColourGrid(), journal=journal, progress=False)
    assert third.resumed_pairs == 1 and len(third.results) == 1  # a scored pair is still taken from the journal
