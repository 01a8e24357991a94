"""Safe file I/O: safetensors only (pickles refused), weights checked finite as they are read, strict
key checks with readable errors, atomic writes (files) and staging folders (cleaned after a kill),
file identities (``short_hash``, ``file_identity``) that name caches and journals, and content
digests (``content_digest``) that say whether a file still holds what a run recorded.

Training checkpoints (rotating files, optimiser and RNG state) are ``runs.checkpoints``'.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from contextlib import contextmanager
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
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt payloads
        raise ValueError(f"{path} is a corrupt or truncated safetensors file: {exc}") from None
    return check_finite_weights(tensors, str(path))


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str) -> Mapping[str, torch.Tensor]:
    """``tensors`` when every floating-point one is finite; else a ValueError naming the first that is not.

    One pass per tensor (``torch.isfinite(...).all()``): every model and checkpoint read goes through
    it, so a NaN in the weights is named at load time instead of turning every feature into NaN."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not tensor.is_meta \
                and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {bad} NaN or Inf value(s) of {tensor.numel()}: the "
                             "weights are corrupt (or a run diverged before they were saved); use another file")
    return tensors


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


DIGEST_CHUNK = 64 << 10  # content_digest reads this much from each end of a file


def regular_file(path: str | Path, what: str = "") -> Path:
    """``path`` when it is a regular file (opening a FIFO would block); a clear error otherwise: a
    folder, a dangling symbolic link, a FIFO / socket / device, or nothing there."""
    path = Path(path)
    named = f"{what} {path}".strip()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"{named} is a symbolic link to {os.readlink(path)}, which does not exist") \
                from None
        raise FileNotFoundError(f"{named} does not exist") from None
    except OSError as exc:  # a name too long, a loop of links, no permission
        raise ValueError(f"{named} cannot be looked up: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        article = "an" if what[:1] in tuple("aeiou") else "a"
        raise ValueError(f"{path} is a folder, not {article} {what + ' ' if what else ''}file")
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise ValueError(f"{named} is a {kind}, not a regular file")
    return path


def content_digest(path: str | Path, mtime: bool = False) -> str:
    """A cheap identity of what a file (a folder: every file in it, by relative name) holds: its size
    and a BLAKE2b digest of its first and last 64 KiB (the whole file when it is at most 128 KiB),
    plus its modification time when ``mtime`` (the extractor's inputs: an edit in the middle of a
    file changes it). Reads at most 128 KiB per file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(q for q in path.rglob("*") if q.is_file())
        return short_hash(*(f"{q.relative_to(path).as_posix()}={content_digest(q, mtime)}" for q in files))
    regular_file(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        digest.update(f"{st.st_size}:{st.st_mtime_ns if mtime else ''}:".encode())
        if st.st_size <= 2 * DIGEST_CHUNK:
            digest.update(f.read())
        else:
            digest.update(f.read(DIGEST_CHUNK))
            f.seek(-DIGEST_CHUNK, os.SEEK_END)
            digest.update(f.read(DIGEST_CHUNK))
    return digest.hexdigest()


def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first and last 64 values of
    every tensor (two models of one architecture differ in all of them; nothing is read in full)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().reshape(-1)
        ends = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        digest.update(ends.view(torch.uint8).numpy().tobytes() if ends.numel() else b"")
    return digest.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def usual_mode(path: str | Path) -> None:
    """Give a file the mode a plain ``open(..., "w")`` would (0644 under the usual umask): temporary
    and staged files start 0600."""
    os.chmod(path, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp)  # mkstemp makes 0600 files (writers may replace it): the usual mode
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


# staging_folder's folders: ".<prefix>-<host>-<pid>-<random>"
_STAGING = re.compile(r"^\.(?P<prefix>[a-z]+)-(?P<host>[^-/]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def remove_stale_staging(parent: str | Path, prefixes) -> list[Path]:
    """Delete the staging folders of ``prefixes`` in ``parent`` that a killed process of this machine
    left (its process is gone); those of live processes and of other machines are left alone."""
    parent, stale = Path(parent), []
    if not parent.is_dir():
        return stale
    for entry in parent.iterdir():
        m = _STAGING.match(entry.name)
        if m and m["prefix"] in prefixes and m["host"] == _host() and entry.is_dir() and not _alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry)
    return stale


@contextmanager
def staging_folder(parent: str | Path, prefix: str):
    """A temporary folder in ``parent`` (same file system: its files can be renamed into place),
    removed on exit; what killed runs of ``prefix`` left in ``parent`` is removed on entry."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent, (prefix,))
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{prefix}-{_host()}-{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_output_file(path: str | Path | None, what: str) -> Path | None:
    """``path`` can be written as a file: it is not a folder and no parent of it is a file (checked
    before the work whose result it receives)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give a file name (e.g. {path / 'summary.json'})")
    check_output_folder(path.parent, what)
    return path


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
