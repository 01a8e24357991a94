"""Training checkpoints: rotating ``step-NNNNNNN.safetensors`` files, optimiser and RNG state as
tensors a safetensors file can hold, and the metrics log cut back to a resumed step.

The file I/O underneath (safetensors only, atomic writes) is ``checkpoint.py``'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint import atomic_write_bytes, read_safetensors, read_safetensors_metadata, write_safetensors

_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (temporary files of interrupted writes excluded)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def write_rotating_checkpoint(folder: Path, step: int, tensors: Mapping[str, torch.Tensor],
                              metadata: Mapping[str, str], keep: int) -> Path:
    """Write step ``step`` atomically, then delete all but the newest ``keep`` (a kill between the two
    leaves one checkpoint too many, never one too few)."""
    path = Path(folder) / checkpoint_name(step)
    write_safetensors(path, tensors, metadata)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def readable_checkpoints(candidates: list[Path], log=print, strict_single: bool = False):
    """Yield ``(path, tensors, metadata)`` newest first, skipping (with a warning) files that cannot be read.

    ``strict_single``: a single named candidate that cannot be read raises instead (the user asked for it)."""
    for path in reversed(candidates):
        try:
            yield path, read_safetensors(path), read_safetensors_metadata(path)
        except (ValueError, FileNotFoundError) as exc:
            if strict_single and len(candidates) == 1:
                raise
            log(f"warning: skipping unreadable checkpoint {path.name}: {exc}")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """The optimiser's per-parameter state as flat tensors (``optim.<index>.<name>``) and its parameter
    groups without the parameters, as JSON: what a safetensors checkpoint can hold."""
    opt = optimizer.state_dict()
    tensors = {f"optim.{index}.{key}": torch.as_tensor(value)
               for index, state in opt["state"].items() for key, value in state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    return tensors, json.dumps(groups)


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups_json: str,
                           device: torch.device | None = None) -> None:
    """Inverse of :func:`optimizer_tensors` for a single-group optimiser (Adam/AdamW: ``betas`` back to a
    tuple); ``device`` moves the moment tensors (``step`` stays where torch keeps it)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device) if device is not None and name != "step" \
                else value
    groups = json.loads(groups_json)
    groups[0]["params"] = list(range(sum(len(g["params"]) for g in optimizer.param_groups)))
    if "betas" in groups[0]:
        groups[0]["betas"] = tuple(groups[0]["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global generator (dropout, initialisation) and, on a GPU, the device's: ``rng.torch`` /
    ``rng.cuda``."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of :func:`rng_tensors` (a GPU state saved on a GPU run is restored on a GPU run only)."""
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def trim_jsonl(path: str | Path, keep, log=print) -> None:
    """Rewrite a JSON-lines log keeping the records ``keep(record)`` accepts, atomically.

    Resumed runs use it to drop records written after their checkpoint. A last line cut short by a
    kill is dropped (with a note); a malformed line anywhere else is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the write a kill interrupted
                log(f"note: dropped the cut-short last line of {path}")
                continue
            raise ValueError(f"{path} line {number} is not JSON (edited or corrupted?): fix or remove that line, "
                             "then resume") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {number} is not a metrics record (no integer 'step')")
        if keep(record):
            kept.append(line)
    payload = "".join(line + "\n" for line in kept).encode()
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(payload))
