"""The small set of checkers every number and untrusted JSON document goes through where it enters.

One meaning everywhere (the API, the command line, config files and ``key=value`` overrides, the
readers of engine files and annotations):

- ``check_int``: an integer, never a ``bool`` (``True`` is 1 to Python, never a count a user
  meant); a float is accepted only when it is a whole number (``2.0``), never truncated (``2.7``
  is refused); a string is refused with the field named.
- ``check_size``: an integer >= 1 (``0`` is an error, not "not given"), optionally a multiple.
- ``check_float``: a finite real number (NaN and Inf refused), optionally bounded.
- ``loads_json`` / ``read_json_file``: JSON whose nesting depth is bounded *before* it is parsed
  (a document nested 100,000 deep raised ``RecursionError`` deep in the parser) and whose file
  size is bounded before it is read; every error names the file.

Limits are module constants (``LIMITS``) that a user may raise or lower, for the whole process, by
assigning them or through the environment (``CLEANDIFT_MAX_JSON_DEPTH``, ``CLEANDIFT_MAX_JSON_BYTES``,
``CLEANDIFT_MAX_IMAGE_PIXELS``); ``limit(name)`` reads the one in force. This module imports
nothing from the package.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path

import numpy as np

LIMITS = {
    "MAX_JSON_DEPTH": 64,  # our formats nest 4 deep at most; the parser recurses once per level
    "MAX_JSON_BYTES": 256 << 20,  # a JSON file read whole (configs, annotations, points, captions)
    "MAX_IMAGE_PIXELS": 8192 * 8192,  # width x height an image may declare before it is decoded
}


def limit(name: str) -> int:
    """The limit in force: ``CLEANDIFT_<NAME>`` from the environment, else ``LIMITS[name]``."""
    raw = os.environ.get(f"CLEANDIFT_{name}")
    if raw is None:
        return LIMITS[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"CLEANDIFT_{name}={raw!r} must be a whole number") from None
    if value < 1:
        raise ValueError(f"CLEANDIFT_{name}={raw!r} must be >= 1")
    return value


def _shown(value) -> str:
    return f"{value!r:.60}"


def check_int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` within ``[lo, hi]``; a ValueError/TypeError naming ``what`` otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an integer, got the boolean {value!r}")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{what} must be a whole number, got {_shown(value)} (it is not rounded or truncated)")
        number = int(value)
    else:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {_shown(value)}")
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else
                                                                                f"<= {hi}")
        raise ValueError(f"{what} must be {bounds}, got {number}")
    return number


def check_size(value, what: str, multiple: int | None = None, hi: int | None = None) -> int:
    """A size or count: an integer >= 1 (and a multiple of ``multiple``, at most ``hi``)."""
    number = check_int(value, what, 1, hi)
    if multiple and number % multiple:
        raise ValueError(f"{what} must be a multiple of {multiple}, got {number}")
    return number


def check_float(value, what: str, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> float:
    """``value`` as a finite ``float`` within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be a number, got the boolean {value!r}")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite (not NaN or Inf), got {number!r}")
    below = lo is not None and (number <= lo if lo_open else number < lo)
    if below or (hi is not None and number > hi):
        low = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
        high = "" if hi is None else f"<= {hi:g}"
        raise ValueError(f"{what} must be {' and '.join(p for p in (low, high) if p)}, got {number!r}")
    return number


_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_BRACKETS = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))  # +1, -1 (int8), 0


def json_depth(data: bytes | str) -> int:
    """Nesting depth of a JSON text (brackets inside strings not counted), without parsing it."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    codes = np.frombuffer(_STRING.sub(b'""', raw).translate(_BRACKETS), np.int8)
    return int(np.cumsum(codes, dtype=np.int32).max(initial=0)) if codes.size else 0


def loads_json(data: bytes | str, what: str, max_depth: int | None = None):
    """``json.loads`` with the nesting depth bounded first (``MAX_JSON_DEPTH``) and errors naming ``what``."""
    depth_limit = limit("MAX_JSON_DEPTH") if max_depth is None else max_depth
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    opened = raw.count(b"[") + raw.count(b"{")  # no deeper than its brackets: most documents stop here
    depth = json_depth(raw) if opened > depth_limit else opened
    if depth > depth_limit:
        raise ValueError(f"{what} nests {depth} levels deep, over the limit of {depth_limit} (corrupt or hostile; "
                         "raise CLEANDIFT_MAX_JSON_DEPTH if it is genuine)")
    try:
        return json.loads(data)
    except RecursionError:  # a limit raised past what Python's parser can follow
        raise ValueError(f"{what} nests {depth} levels deep, deeper than the JSON parser can follow") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_json_file(path, what: str | None = None, max_bytes: int | None = None):
    """A JSON file checked before it is read (a regular file, at most ``MAX_JSON_BYTES``), parsed by ``loads_json``."""
    path = Path(path)
    what = what or str(path)
    if path.is_dir():
        raise ValueError(f"{what} is a folder, not a JSON file")
    if not path.exists():
        raise FileNotFoundError(f"{what} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} is not a regular file (a FIFO, socket or device?)")
    size_limit = limit("MAX_JSON_BYTES") if max_bytes is None else max_bytes
    size = path.stat().st_size
    if size > size_limit:
        raise ValueError(f"{what} is {size} bytes, over the {size_limit}-byte limit for JSON files (raise "
                         "CLEANDIFT_MAX_JSON_BYTES if it is genuine)")
    return loads_json(path.read_bytes(), what)
