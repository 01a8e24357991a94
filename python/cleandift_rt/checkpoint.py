"""Safe checkpoint I/O: safetensors only, strict key checks with readable errors, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch.save zip archive


def _describe_non_safetensors(path: Path, head: bytes) -> str | None:
    if head[:1] == _PICKLE_MAGIC[0] or head[:4] == _PICKLE_MAGIC[1]:
        return (f"{path} is a pickle / torch.save file, not safetensors. Pickles can run arbitrary code, so "
                "cleandift-rt never loads them. Convert it once in a trusted environment: "
                "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`")
    return None


def _check_safetensors_file(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a safetensors checkpoint: pass the .safetensors file (a diffusers "
                         "folder goes to load_base, or to Engine / export/export_onnx.py as the model itself)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 8:
        raise ValueError(f"{path} is empty or truncated ({size} bytes): not a safetensors file")
    # A header length whose low byte is 0x80 looks like pickle's magic: a JSON header settles it.
    looks_safetensors = head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
    reason = None if looks_safetensors else _describe_non_safetensors(path, head)
    if reason:
        raise ValueError(reason)
    header_len = int.from_bytes(head[:8], "little")
    if header_len <= 0 or 8 + header_len > size:
        raise ValueError(f"{path} is not a valid safetensors file (header length {header_len}, file size {size}): "
                         "truncated or corrupt; re-copy or re-export it")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file to CPU, with an error that says what the file is when it is not one."""
    path = Path(path)
    _check_safetensors_file(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt payloads
        raise ValueError(f"{path} is a corrupt or truncated safetensors file: {exc}") from None


def _header(path: Path, read):
    """``read(opened file)`` on the safetensors header, with the errors of a corrupt file named."""
    from safetensors import safe_open

    _check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is a corrupt or truncated safetensors file: {exc}") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    return _header(Path(path), lambda f: dict(f.metadata() or {}))


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the file's header, without reading any data."""
    return _header(Path(path), lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})


def short_hash(*parts) -> str:
    """16 hex digits naming a combination of values (cache folders, journal keys)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> str:
    """Path, size and modification time (a folder: of every file in it): changes when a file is
    replaced, and costs no read of a 3 GB engine."""
    p = Path(path).resolve()
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        return short_hash(p, *(f"{q.relative_to(p)}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files))
    st = p.stat()
    return short_hash(p, st.st_size, st.st_mtime_ns)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files (writers may replace it): the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# atomic_write_bytes' temporaries: ".<target name>.<8 random characters of mkstemp>.tmp"
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what killed atomic writes left in ``folder`` (a SIGKILL never reaches the cleanup).

    Call it where no writer can be active, e.g. when a run starts or resumes in its own folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """``path`` can be (or become) a folder: neither it nor any of its parents is a file."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is under {candidate}, which is a file"
                raise ValueError(f"{what} {path} {where}: give a folder")
            break
    return path


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage and non-contiguous views; a contiguous clone per tensor fixes both.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, lambda tmp: save_file(plain, tmp, metadata=meta))


def check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys (first few of each)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}"
                 for k in sorted(set(expected) & set(got)) if tuple(expected[k].shape) != tuple(got[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source} does not match the model it is loaded into ({'; '.join(problems)}). "
                         "Check that the checkpoint and the base model are the same SD version and format")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(dict(state), strict=True)


# -- rotating training checkpoints (train.py, train-gate, train-aggregator) -------------------------

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
