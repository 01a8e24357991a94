"""The wire protocol of ``cleandift-rt serve``: model, tensor and parameter names both ends use.

Two models on Triton's KServe-v2 protocol (HTTP and gRPC, binary tensors):

``cleandift`` (``FEATURES_MODEL``)
    input ``images``: UINT8 ``[B, H, W, 3]`` RGB, any size of at least 64 px a side; the server applies
    the engine's size policy (``stretch`` or ``pad``) exactly as ``Engine.extract`` does.
    outputs: one FP32 ``[B, C, h, w]`` tensor per tap of the engine, named after the tap; a request
    names the taps it wants as its requested outputs (none named: all of them).

``cleandift_match`` (``MATCH_MODEL``)
    inputs: ``images_a`` and ``images_b`` (UINT8 ``[B, H, W, 3]``), or ``features_a`` and
    ``features_b`` (FP32 ``[B, C, h, w]``, e.g. what ``cleandift`` returned); parameters ``tap`` (images
    only; default: the server's match tap) and ``mutual`` (bool).
    outputs: ``index`` INT64 ``[B, N]`` (for every cell y * w + x of a, the cell of b it matches; -1 where
    ``mutual`` finds no mutual match) and ``similarity`` FP32 ``[B, N]``, from ``cleandift_rt.match``.

This module imports nothing but the standard library and numpy, so the client and the server share it.
"""

from __future__ import annotations

import re

import numpy as np

FEATURES_MODEL = "cleandift"
MATCH_MODEL = "cleandift_match"

IMAGES = "images"
IMAGES_A, IMAGES_B = "images_a", "images_b"
FEATURES_A, FEATURES_B = "features_a", "features_b"
INDEX, SIMILARITY = "index", "similarity"
PARAM_TAP, PARAM_MUTUAL = "tap", "mutual"

# Triton's names of the numpy dtypes the protocol uses
TRITON_DTYPES = {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}

# An exception raised inside the server's Python function reaches the client as its traceback; the
# message is the last line that names an exception ("ValueError: ...").
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w*(?:Error|Exception)): (.+)$")


def exception_in(text: str) -> tuple[str, str] | None:
    """(exception type name, message) of the last exception line in a server error text, or None when
    the text is one of Triton's own one-line errors."""
    for line in reversed(text.strip().splitlines()):
        found = _EXCEPTION_LINE.match(line.strip())
        if found:
            return found.group(1), found.group(2)
    return None


def parse_mutual(value) -> bool:
    """The ``mutual`` parameter: a bool (JSON true/false, or the strings "true"/"false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"parameter {PARAM_MUTUAL!r} must be true or false, got {value!r}")
