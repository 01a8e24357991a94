"""Linear probes and how they are trained: the shared base class, the schedule, early stopping, checkpoints.

A probe is a per-pixel linear layer (a 1 x 1 convolution) on the tap's own grid, after a fixed
per-channel standardisation with the training features' mean and standard deviation (the linear
probe protocols put a batch norm there; fixed statistics keep the probe linear and the learning rate
independent of each tap's scale). Training, the same for every probe:

* AdamW (lr 1e-3, weight decay 0.01, betas 0.9 / 0.999), batches of 8 images;
* learning rate: linear warm-up over the first epoch, then cosine decay to 0 at the last epoch;
* fixed seeds: the weight initialisation, the held-out split and each epoch's order all come from
  ``seed``, so a run is reproducible and a resumed run equals an uninterrupted one bit for bit;
* early stopping: ``val_fraction`` of the training images is held out; after each epoch the
  held-out loss (the training loss, per image, averaged) decides: the best epoch's weights are kept
  and training stops after ``patience`` epochs without improvement;
* after every epoch the whole state (weights, best weights, optimiser moments, history) is written
  atomically to the checkpoint; a rerun with the same data and settings resumes from it (the epochs
  are steps of ``runs.loop.ResumableRun``; a checkpoint of other data or settings is trained over).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import load_strict, read_safetensors, read_safetensors_metadata, write_safetensors
from ..runs.loop import ResumableRun

META_KEY = "cleandift_rt_probe"
CHECKPOINT_FORMAT = "cleandift_rt_probe_checkpoint"
_KINDS: dict[str, type] = {}


@dataclass
class ProbeTrainConfig:
    """How every probe is trained (the module docstring); ``probes.TrainConfig`` is its old name."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(f"epochs, batch_size and patience must be >= 1, got {self.epochs}, {self.batch_size}, "
                             f"{self.patience}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.val_fraction < 1):
            raise ValueError(f"need lr > 0, weight_decay >= 0 and 0 <= val_fraction < 1, got {self.lr}, "
                             f"{self.weight_decay}, {self.val_fraction}")


def learning_rate(config: ProbeTrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over the first epoch, then cosine decay to 0 at the end of the last epoch."""
    total = config.epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / steps_per_epoch)
    return config.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))


def as_batch(features: Sequence, index) -> torch.Tensor:
    """``[B, C, h, w]`` float32 from cached (memory-mapped, possibly float16) per-image maps."""
    return torch.from_numpy(np.stack([np.asarray(features[i], dtype=np.float32) for i in index]))


class LinearProbe(nn.Module):
    """A 1 x 1 convolution ``channels -> outputs`` on standardised features. Subclasses define the
    loss (``loss(features, targets)``), the initial bias and what ``meta()`` records."""

    kind = "linear"
    initial_bias = 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _KINDS[cls.kind] = cls

    def __init__(self, channels: int, outputs: int):
        super().__init__()
        if channels < 1 or outputs < 1:
            raise ValueError(f"a probe needs channels >= 1 and outputs >= 1, got {channels}, {outputs}")
        self.channels, self.outputs = int(channels), int(outputs)
        self.register_buffer("mean", torch.zeros(self.channels))
        self.register_buffer("std", torch.ones(self.channels))
        self.linear = nn.Conv2d(self.channels, self.outputs, 1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.channels:
            raise ValueError(f"this probe takes [B, {self.channels}, h, w] features, got {tuple(features.shape)}: "
                             "was it trained on another tap or model?")
        x = (features - self.mean[:, None, None]) / self.std[:, None, None]
        return self.linear(x)

    def prepare(self, target, grid: tuple[int, int]):
        """The parts of one target the loss needs that stay fixed during training (computed once)."""
        raise NotImplementedError

    def _loss(self, features: torch.Tensor, prepared: Sequence) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, features: torch.Tensor, targets: Sequence) -> torch.Tensor:
        """The training loss of ``features [B, C, h, w]`` against the raw targets (one per image)."""
        grid = tuple(features.shape[-2:])
        return self._loss(features, [self.prepare(t, grid) for t in targets])

    def meta(self) -> dict:
        return {"kind": self.kind, "channels": self.channels}

    @classmethod
    def from_meta(cls, meta: dict) -> LinearProbe:
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------

    def _standardise_from(self, features: Sequence, index: Sequence[int]) -> None:
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        count = 0
        for i in index:
            f = np.asarray(features[i], dtype=np.float64).reshape(self.channels, -1)
            total += f.sum(1)
            squares += (f * f).sum(1)
            count += f.shape[1]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0))
        std = np.where(std > 1e-6 * max(1.0, float(np.abs(mean).max())), std, 1.0)  # constant channels stay as is
        self.mean.copy_(torch.from_numpy(mean).float())
        self.std.copy_(torch.from_numpy(std).float())

    def _reset(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=gen) * 0.01)
            self.linear.bias.fill_(self.initial_bias)

    def _mean_loss(self, features: Sequence, prepared, index: Sequence[int]) -> float:
        with torch.no_grad():
            return float(np.mean([self._loss(as_batch(features, [i]), [prepared(i)]).item() for i in index]))

    def fit(self, features: Sequence, targets: Sequence, config: ProbeTrainConfig | None = None, *,
            checkpoint: str | Path | None = None, fingerprint: str = "", progress: bool = False,
            on_epoch: Callable[[int], None] | None = None) -> dict:
        """Train on ``features[i]`` (``[C, h, w]`` arrays, memory maps welcome) and ``targets[i]``.

        ``checkpoint``: a ``.safetensors`` path for the training state (resumed when it exists and
        ``fingerprint`` and the settings match). ``on_epoch(epoch)`` is called after each epoch's
        checkpoint. Returns a report (epochs run, best epoch, losses per epoch).
        """
        config = config or ProbeTrainConfig()
        n = len(features)
        if n == 0 or len(targets) != n:
            raise ValueError(f"fit needs one target per feature map and at least one of each, got {n} and {len(targets)}")
        run = _ProbeFit(self, features, targets, config, checkpoint, fingerprint, progress, on_epoch)
        resumed_at = run.step
        start = time.perf_counter()
        run.run_steps(config.epochs, checkpoint_every=1)
        self.load_state_dict(run.best)
        self.eval()
        state = run.state
        return {"fit_images": len(run.fit_idx), "held_out_images": len(run.val_idx), "epochs_run": run.step,
                "best_epoch": state["best_epoch"], "best_held_out_loss": state["best_loss"],
                "stopped_early": run.step < config.epochs, "resumed_at_epoch": resumed_at,
                "seconds": time.perf_counter() - start, "config": asdict(config), "history": state["history"]}

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, info: dict | None = None) -> None:
        """Weights and what the probe is (kind, channels, bins or classes) in one safetensors file,
        written atomically; ``info`` (tap, features it was trained on) travels in the metadata."""
        write_safetensors(path, self.state_dict(), {META_KEY: self.meta(), "info": info or {}})


def load_probe(path: str | Path) -> tuple[LinearProbe, dict]:
    """A probe saved by ``LinearProbe.save``, and the ``info`` saved with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe file {path} does not exist")
    meta = read_safetensors_metadata(path)
    if META_KEY not in meta:
        raise ValueError(f"{path} is not a probe written by cleandift-rt (no {META_KEY!r} metadata)")
    probe_meta = json.loads(meta[META_KEY])
    cls = _KINDS.get(probe_meta.get("kind"))
    if cls is None:
        raise ValueError(f"{path}: unknown probe kind {probe_meta.get('kind')!r} (known: {', '.join(sorted(_KINDS))})")
    probe = cls.from_meta(probe_meta)
    load_strict(probe, read_safetensors(path), str(path))
    return probe.eval(), json.loads(meta.get("info", "{}"))


class _ProbeFit(ResumableRun):
    """One probe's training as steps of the run loop: a step is an epoch, the held-out loss decides
    the best weights and the early stop, the single checkpoint file is rewritten after every epoch."""

    kind = "probe"
    checkpoint_format = CHECKPOINT_FORMAT
    progress_unit = "epoch"

    def __init__(self, probe: LinearProbe, features: Sequence, targets: Sequence, config: ProbeTrainConfig,
                 checkpoint: str | Path | None, fingerprint: str, progress: bool, on_epoch):
        self.probe, self.features, self.targets, self.config = probe, features, targets, config
        n = len(features)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_val = min(round(n * config.val_fraction), n - 1)  # at least one image to fit
        self.val_idx, self.fit_idx = sorted(order[:n_val]), sorted(order[n_val:])
        probe._standardise_from(features, self.fit_idx)
        probe._reset(config.seed)
        self.optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.fit_idx) / config.batch_size)
        # everything the weights depend on: a checkpoint with another key is another run's
        self.key = json.dumps({"config": asdict(config), "probe": probe.meta(), "n": n, "data": fingerprint},
                              sort_keys=True)
        self.state = {"best_epoch": -1, "best_loss": math.inf, "bad_epochs": 0, "history": []}
        self.best = {k: v.clone() for k, v in probe.state_dict().items()}
        self.grid = tuple(np.asarray(features[0]).shape[-2:])
        self.ready: dict[int, object] = {}
        self.progress_desc = f"train {probe.kind} probe"
        self.open_run(None, resume=True, progress=progress, log=lambda message: None, checkpoint_file=checkpoint,
                      on_step=None if on_epoch is None else lambda step, record: on_epoch(step - 1))
        if checkpoint is not None:
            self.resume(True)

    def prepared(self, i: int):
        if i not in self.ready:
            self.ready[i] = self.probe.prepare(self.targets[i], self.grid)
        return self.ready[i]

    def finished(self) -> bool:
        return self.state["bad_epochs"] >= self.config.patience

    def train_step(self) -> dict:
        c, probe, epoch = self.config, self.probe, self.step
        probe.train()
        perm = torch.randperm(len(self.fit_idx), generator=torch.Generator().manual_seed(c.seed + 1 + epoch)).tolist()
        losses = []
        for s in range(self.steps_per_epoch):
            batch = [self.fit_idx[j] for j in perm[s * c.batch_size:(s + 1) * c.batch_size]]
            lr = learning_rate(c, epoch * self.steps_per_epoch + s, self.steps_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = probe._loss(as_batch(self.features, batch), [self.prepared(i) for i in batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        probe.eval()
        train_loss = float(np.mean(losses))
        val_loss = probe._mean_loss(self.features, self.prepared, self.val_idx) if self.val_idx else train_loss
        if val_loss < self.state["best_loss"]:
            self.state.update(best_loss=val_loss, best_epoch=epoch, bad_epochs=0)
            self.best = {k: v.clone() for k, v in probe.state_dict().items()}
        else:
            self.state["bad_epochs"] += 1
        self.step += 1
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr}
        self.state["history"].append(record)
        return record

    def postfix(self, record: dict) -> dict:
        return {"train": f"{record['train_loss']:.4f}", "held_out": f"{record['val_loss']:.4f}"}

    def checkpoint_state(self) -> tuple[dict, dict]:
        tensors = {f"model.{k}": v for k, v in self.probe.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in self.best.items()})
        return tensors, {"key": self.key, "state": json.dumps(self.state)}

    def other_changes(self, metadata: dict) -> list[str]:
        return [] if metadata.get("key") == self.key else ["the data, the probe or its settings"]

    def load_checkpoint_state(self, path: Path, tensors: dict, metadata: dict) -> None:
        self.probe.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.state = json.loads(metadata["state"])
