"""The ``.plan`` container: a TensorRT engine behind a self-describing JSON header.

Layout: ``PLAN_MAGIC``, the header length (u64, little endian), the JSON header (the export
metadata, TensorRT version, GPU architecture, profile, build summary and the baked prompt
embedding), then the serialized engine. ``export.trt_build`` writes it; the TensorRT backend and
``describe`` read it, checking every field the runtime relies on before anything is deserialized.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np

from ..checks import loads_json

PLAN_MAGIC = b"CDRTPLAN"
_PLAN_LENGTH = struct.Struct("<Q")


def read_plan_header(path: str | Path) -> tuple[dict, int, int]:
    """(header dict, offset of the engine bytes, engine byte count) of a ``.plan`` written by ``trt_build``."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(PLAN_MAGIC) + _PLAN_LENGTH.size)
        if len(head) < len(PLAN_MAGIC) + _PLAN_LENGTH.size or not head.startswith(PLAN_MAGIC):
            raise ValueError(f"{path} is not a cleandift-rt TensorRT plan (missing the {PLAN_MAGIC.decode()} header): "
                             "build it with `python export/build_engine.py`")
        (length,) = _PLAN_LENGTH.unpack(head[len(PLAN_MAGIC):])
        if length > size:
            raise ValueError(f"{path} is truncated: its header alone should be {length} bytes, the file has {size}")
        try:
            header = loads_json(f.read(length), f"{path}'s header")  # nesting bounded before parsing
        except ValueError as exc:
            raise ValueError(f"{path} has a corrupt header ({exc}): rebuild it with `python export/build_engine.py`") \
                from None
    _check_plan_header(header, path)
    offset = len(PLAN_MAGIC) + _PLAN_LENGTH.size + length
    expected = header["engine_bytes"]  # present and an int: _check_plan_header
    if size - offset != expected:
        raise ValueError(f"{path} is truncated or corrupt: it should hold {expected} engine bytes after the header, "
                         f"it holds {size - offset}")
    return header, offset, expected


# What the runtime reads from a plan header, and the JSON types it needs (see trt_build.plan_header).
_PLAN_HEADER_FIELDS = {"info": dict, "profile": dict, "default_prompt_embeds": dict, "engine_bytes": int}
_PLAN_PROFILE_FIELDS = {"batch": dict, "tokens": int}


def _check_plan_header(header, path: Path) -> None:
    """A header that parsed as JSON but lacks what the runtime reads is corrupt: say what is missing."""
    def missing(d, fields, prefix=""):  # a bool is no int here: ``engine_bytes: true`` is corrupt
        return [prefix + k for k, kind in fields.items()
                if not isinstance(d.get(k), kind) or (kind is int and isinstance(d.get(k), bool))]

    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt header (a JSON {type(header).__name__}, not an object): rebuild it "
                         "with `python export/build_engine.py`")
    bad = missing(header, _PLAN_HEADER_FIELDS)
    if not bad:
        bad = missing(header["profile"], _PLAN_PROFILE_FIELDS, "profile.")
    if bad:
        raise ValueError(f"{path} has a corrupt header (missing or malformed: {', '.join(bad)}): rebuild it with "
                         "`python export/build_engine.py`")


def plan_header_bytes(header: dict) -> bytes:
    payload = json.dumps(header).encode()
    return PLAN_MAGIC + _PLAN_LENGTH.pack(len(payload)) + payload


HEADER_DTYPES = ("float32", "float16")
MAX_HEADER_ARRAY_BYTES = 64 << 20  # the baked prompt embedding: 77 x 1024 floats is 308 KB


def decode_array(blob: dict) -> np.ndarray:
    """An array stored in the plan header as {"dtype", "shape", "base64"}, checked before it is built."""
    if not isinstance(blob, dict) or blob.get("dtype") not in HEADER_DTYPES or not isinstance(blob.get("shape"), list) \
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in blob["shape"]) \
            or not isinstance(blob.get("base64"), str):
        raise ValueError("corrupt plan header: an embedded array is not {dtype: float32|float16, shape: [ints], "
                         "base64: str}; rebuild the plan")
    itemsize = np.dtype(blob["dtype"]).itemsize
    count = 1
    for d in blob["shape"]:
        count *= d
    if count * itemsize > MAX_HEADER_ARRAY_BYTES or len(blob["base64"]) > 2 * MAX_HEADER_ARRAY_BYTES:
        raise ValueError(f"corrupt plan header: an embedded array of shape {blob['shape']} is implausibly large")
    try:
        raw = base64.b64decode(blob["base64"], validate=True)
    except ValueError:
        raise ValueError("corrupt plan header: an embedded array is not valid base64; rebuild the plan") from None
    if len(raw) != count * itemsize:
        raise ValueError(f"corrupt plan header: an embedded array holds {len(raw)} bytes, its shape "
                         f"{blob['shape']} needs {count * itemsize}; rebuild the plan")
    return np.frombuffer(raw, dtype=np.dtype(blob["dtype"])).reshape(blob["shape"]).copy()


def encode_array(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "base64": base64.b64encode(array.tobytes()).decode()}
