"""The resumable run loop every trainer builds on (the student, GATE, the aggregator, the probes).

A subclass supplies the steps: :meth:`ResumableRun.train_step` (one step, returns its metrics
record), :meth:`~ResumableRun.validation`, and its part of a checkpoint
(:meth:`~ResumableRun.checkpoint_state` / :meth:`~ResumableRun.load_checkpoint_state`). The loop
owns the rest, the same for every run:

* the output folder: what killed atomic writes left is removed; an ``OUT`` that already holds
  checkpoints is refused unless the run resumes;
* resume: from the newest readable checkpoint (an unreadable one is skipped with a warning) or a
  named one; a checkpoint of another kind is refused, as is one whose objective differs (the
  ``objective_fields`` of the config, what the run was made from, :meth:`~ResumableRun.identities`,
  such as the base model's weights, plus what :meth:`~ResumableRun.other_changes` names); other
  changed settings are noted;
* ``metrics.jsonl`` cut back to the resumed step (a line a kill cut short dropped), so the resumed
  run writes the same log as an uninterrupted one;
* the progress bar, validation every ``validate_every`` steps and at the end, a checkpoint every
  ``checkpoint_every`` steps and at the end, ``on_step(step, record)`` after each step.

A checkpoint holds the subclass's tensors and metadata plus ``format``, ``step``, ``config`` and the
optimiser's state (``self.optimizer``); RNG state is the subclass's to save (``rng_tensors``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import check_output_folder, remove_stale_temporaries, write_safetensors
from .checkpoints import (list_checkpoints, load_optimizer_tensors, optimizer_tensors, readable_checkpoints, trim_jsonl,
                          write_rotating_checkpoint)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def set_deterministic(device: torch.device | None = None) -> None:
    """What PyTorch needs for bit-identical runs (``deterministic=true``), for the whole process:
    deterministic algorithms (an op that has none raises, naming itself), one CPU thread (parallel
    reductions sum in an order that depends on the threads: two runs with the default count differ
    by about 1e-5 after 30 steps), cuDNN without autotuning and cuBLAS with a fixed workspace. The
    seeds come from the config, as in every run."""
    if device is not None and torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_num_threads(1)


def _plain(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a saved config."""
    return json.loads(json.dumps(value))


class ResumableRun:
    """Base of every resumable training run; see the module docstring for what it owns.

    Class attributes a subclass sets: ``kind`` (names the run in messages: "training", "GATE"),
    ``checkpoint_format`` (the checkpoints' ``format`` metadata), ``objective_fields`` (config fields
    a resumed run must share), ``free_fields`` (fields that may change on resume without a note),
    ``progress_desc`` / ``progress_unit``, ``validation_record`` (``"step"``: validation results go
    into the step's metrics record; ``"own"``: a record of their own after it) and
    ``validate_first`` (validate the untrained model before step 1).
    """

    kind = "training"
    checkpoint_format = ""
    objective_fields: tuple[str, ...] = ()
    free_fields: tuple[str, ...] = ()
    progress_desc = "train"
    progress_unit = "step"
    validation_record = "step"
    validate_first = False

    config: object  # a dataclass: saved in every checkpoint, compared on resume
    optimizer: torch.optim.Optimizer

    def open_run(self, out: str | Path | None, *, resume, keep_checkpoints: int = 1, progress: bool = True,
                 log: Callable[[str], None] = print, checkpoint_file: str | Path | None = None,
                 on_step: Callable[[int, dict], None] | None = None) -> None:
        """Set up the run's folder before anything expensive happens.

        ``out``: the run's folder (``checkpoints/`` and ``metrics.jsonl`` in it); None for a run
        without either (the probes: ``checkpoint_file`` is then its single checkpoint, rewritten
        every step, and the run always resumes from it when it is its own).
        """
        self.step = 0
        self.progress, self.log, self.on_step = progress, log, on_step
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_file = Path(checkpoint_file) if checkpoint_file is not None else None
        if out is None:
            self.out = self.checkpoint_dir = self.metrics_path = None
            return
        self.out = check_output_folder(out)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        self.metrics_path = self.out / METRICS_FILE
        for folder in (self.out, self.checkpoint_dir):
            for stale in remove_stale_temporaries(folder):
                self.log(f"removed {stale}, left by an interrupted write")
        if not resume and list_checkpoints(self.checkpoint_dir):
            raise ValueError(f"{self.out} already holds {self.kind} checkpoints: pass --resume to continue that run "
                             "or choose another --out")

    def optimizer_step(self, loss: torch.Tensor, advice: str = "lower the learning rate") -> float:
        """Back-propagate ``loss``, step ``self.optimizer`` and advance ``self.step``; a non-finite loss stops
        the run before any weight changes, with ``advice``. Returns the loss as a float."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step + 1}: {advice}; the last checkpoint is "
                                     "still valid")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return value

    # -- what a subclass supplies ----------------------------------------------------------------

    def train_step(self) -> dict:
        """One step: advance ``self.step`` and return the step's metrics record."""
        raise NotImplementedError

    def validation(self) -> tuple[dict, str] | None:
        """(fields for the metrics, a line to print), or None when there is nothing to validate."""
        return None

    def postfix(self, record: dict) -> dict:
        """What the progress bar shows after a step."""
        return {"loss": f"{record['loss']:.4f}"}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The subclass's tensors and metadata of a checkpoint (the model, RNG state, data position)."""
        raise NotImplementedError

    def load_checkpoint_state(self, path: Path, tensors: dict, metadata: dict) -> None:
        """Restore what :meth:`checkpoint_state` saved (the objective is already checked)."""
        raise NotImplementedError

    def saved_config(self, metadata: dict, path: Path) -> dict:
        """The config a checkpoint was written with (a subclass upgrades old field names here)."""
        return json.loads(metadata["config"])

    def other_changes(self, metadata: dict) -> list[str]:
        """What else must not change on resume, when it did (the data, the feature bucket)."""
        return []

    def identities(self) -> dict[str, str]:
        """What the run is made from, by content (``{"base model": fingerprint}``): saved in every
        checkpoint and compared on resume, so a run is never continued from another base model."""
        return {}

    def keep_metric(self, record: dict) -> None:
        """Called with each metrics record a resume keeps (a subclass restores running values)."""

    def finished(self) -> bool:
        """True to stop before the step count is reached (early stopping)."""
        return False

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the whole training state atomically (in ``OUT/checkpoints``: then delete all but the
        newest ``keep_checkpoints``)."""
        tensors, metadata = self.checkpoint_state()
        optim, groups = optimizer_tensors(self.optimizer)
        tensors = {**tensors, **optim}
        metadata = {"format": self.checkpoint_format, "step": str(self.step),
                    "config": json.dumps(dataclasses.asdict(self.config)), **metadata, "optim_groups": groups}
        if self.identities():
            metadata["identities"] = json.dumps(self.identities())
        if self.checkpoint_file is not None:
            write_safetensors(self.checkpoint_file, tensors, metadata)
            return self.checkpoint_file
        return write_rotating_checkpoint(self.checkpoint_dir, self.step, tensors, metadata, self.keep_checkpoints)

    def resume(self, resume: bool | str | Path | None) -> bool:
        """Continue from a checkpoint: ``True`` the newest readable one of this run (none yet: start at
        step 0, as a requeue that always passes --resume needs), a path that file or the newest in
        that folder. Returns whether a checkpoint was loaded."""
        if not resume:
            return False
        if self.checkpoint_file is not None:
            return self._resume_own_file()
        if resume is True:
            where, candidates = self.checkpoint_dir, list_checkpoints(self.checkpoint_dir)
            if not candidates:
                self.log(f"note: --resume found no checkpoint in {where}: starting at step 0")
                return False
        else:
            where = Path(resume)
            candidates = list_checkpoints(where) if where.is_dir() else [where]
            if not candidates:
                raise ValueError(f"--resume: no checkpoints (step-*.safetensors) in {where}")
        for path, tensors, metadata in readable_checkpoints(candidates, self.log, strict_single=resume is not True):
            self._restore(path, tensors, metadata, self._changes(path, metadata))
            self.log(f"resumed from {path} at step {self.step}")
            if self.metrics_path is not None:
                trim_jsonl(self.metrics_path, self._kept, self.log)
            return True
        raise ValueError(f"--resume: none of the checkpoints in {where} is readable")

    def _resume_own_file(self) -> bool:
        """The single checkpoint file, when it is readable and this very run's; otherwise start over."""
        if not self.checkpoint_file.is_file():
            return False
        for path, tensors, metadata in readable_checkpoints([self.checkpoint_file], self.log):
            if metadata.get("format") == self.checkpoint_format and not self._changes(path, metadata):
                self._restore(path, tensors, metadata, [])
                return True
        return False

    def _kept(self, record: dict) -> bool:
        if record["step"] > self.step:
            return False
        self.keep_metric(record)
        return True

    def _changes(self, path: Path, metadata: dict) -> list[str]:
        """What differs between this run and the checkpoint's (empty: it may be resumed)."""
        if metadata.get("format") != self.checkpoint_format:
            raise ValueError(f"{path} is not a training checkpoint of this command (format "
                             f"{metadata.get('format')!r}, expected {self.checkpoint_format!r}): resume from the "
                             f"step-*.safetensors files in {CHECKPOINT_DIR}/ of its --out")
        saved = self.saved_config(metadata, path)
        current = _plain(dataclasses.asdict(self.config))
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in self.objective_fields
                   if saved.get(k) != current[k]]
        ours, theirs = self.identities(), json.loads(metadata.get("identities", "{}"))
        changed += [f"the {k} (its weights differ from the one the checkpoint was trained from)" for k in ours
                    if k in theirs and theirs[k] != ours[k]]
        unknown = [k for k in ours if k not in theirs]
        if unknown:
            self.log(f"note: {path.name} does not record its {', '.join(unknown)} (an older checkpoint): not checked")
        return changed + self.other_changes(metadata)

    def _restore(self, path: Path, tensors: dict, metadata: dict, changed: list[str]) -> None:
        if changed:
            raise ValueError(f"cannot resume {path}: the run changed, its objective changed ({'; '.join(changed)}); "
                             "use the original settings or start a new run in another --out")
        saved = self.saved_config(metadata, path)
        current = _plain(dataclasses.asdict(self.config))
        retuned = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in saved
                   if k not in self.objective_fields and k not in self.free_fields and k in current
                   and saved[k] != current[k]]
        if retuned:
            self.log(f"note: resuming with changed settings ({'; '.join(retuned)})")
        self.load_checkpoint_state(path, tensors, metadata)
        device = next((p.device for g in self.optimizer.param_groups for p in g["params"]), None)
        load_optimizer_tensors(self.optimizer, tensors, metadata["optim_groups"], device)
        self.step = int(metadata["step"])

    # -- the loop --------------------------------------------------------------------------------

    def run_steps(self, total: int, validate_every: int = 0, checkpoint_every: int = 0) -> dict | None:
        """Step until ``total`` steps are done (or :meth:`finished`); returns the last step's record."""
        from tqdm.auto import tqdm

        metrics = None
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics = open(self.metrics_path, "w" if self.step == 0 else "a")
        bar = tqdm(total=total, initial=min(self.step, total), desc=self.progress_desc, unit=self.progress_unit,
                   dynamic_ncols=True, disable=not self.progress)
        record = None

        def write(entry: dict) -> None:
            if metrics is not None:
                metrics.write(json.dumps(entry) + "\n")
                metrics.flush()

        def validation(step_record: dict | None) -> None:
            result = self.validation()
            if result is None:
                return
            fields, line = result
            if step_record is not None and self.validation_record == "step":
                step_record.update(fields)
            else:
                write({"step": self.step, **fields})
            bar.write(line)

        try:
            if self.validate_first and self.step == 0:
                validation(None)  # the untrained model
            while self.step < total and not self.finished():
                record = self.train_step()
                last = self.step == total
                due = last or (validate_every and self.step % validate_every == 0)
                if due and self.validation_record == "step":
                    validation(record)
                write(record)
                if due and self.validation_record == "own":
                    validation(record)
                bar.set_postfix(**self.postfix(record))
                bar.update(1)
                if (self.checkpoint_dir is not None or self.checkpoint_file is not None) \
                        and (last or (checkpoint_every and self.step % checkpoint_every == 0)):
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.step, record)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return record
