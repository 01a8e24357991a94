"""Safe file I/O: safetensors only (pickles refused), strict key checks with readable errors, atomic
writes, and file identities (``short_hash``, ``file_identity``) that name caches and journals.

Training checkpoints (rotating files, optimiser and RNG state) are ``runs.checkpoints``'.
"""

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
