"""What the server does with a batch of requests: checks, one engine call per image size, replies.

Triton's dynamic batcher hands the bound function every request that arrived within the queue delay
(up to the model's maximum batch), and refuses by itself what the model configuration excludes (a
wrong dtype or rank, a batch over the limit, an output the model does not have, a payload whose
size does not match its shape). The rest is checked here, per request, and raised as a ValueError
whose message names the problem; PyTriton returns it to the client as the request's error and the
server goes on serving. Triton batches only requests of one shape together and every check here but
the ``cleandift_match`` parameters depends on the shape alone, so a well-formed request never shares
a batch with a malformed one on the ``cleandift`` model.

Requests are plain objects with ``data`` ({input name: numpy array}), ``parameters`` (dict) and
``requested_output_names`` (list): PyTriton's ``Request``, or anything shaped like it.
"""

from __future__ import annotations

import numpy as np

from ..checks import limit
from ..kernels.matching import match
from ..taps import DEFAULT_TAP
from .protocol import (
    FEATURES_A,
    FEATURES_B,
    IMAGES,
    IMAGES_A,
    IMAGES_B,
    INDEX,
    PARAM_MUTUAL,
    PARAM_TAP,
    SIMILARITY,
    parse_mutual,
)


def check_images(array, name: str) -> np.ndarray:
    """A request's uint8 ``[B, H, W, 3]`` images (the minimum side is ``prepare_images``' to check)."""
    if array is None:
        raise ValueError(f"input {name!r} is missing")
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise ValueError(f"input {name!r} must be UINT8 [B, H, W, 3] RGB images, got {array.dtype} "
                         f"{list(array.shape)}")
    pixels = int(array.shape[1]) * int(array.shape[2])
    if pixels > limit("MAX_IMAGE_PIXELS"):
        raise ValueError(f"input {name!r}: {array.shape[2]}x{array.shape[1]} images exceed the server's "
                         f"{limit('MAX_IMAGE_PIXELS')} pixels (CLEANDIFT_MAX_IMAGE_PIXELS on the server)")
    return array


def check_features(array, name: str) -> np.ndarray:
    if array is None:
        raise ValueError(f"input {name!r} is missing")
    if array.dtype != np.float32 or array.ndim != 4 or 0 in array.shape:
        raise ValueError(f"input {name!r} must be FP32 [B, C, h, w] feature maps, got {array.dtype} "
                         f"{list(array.shape)}")
    return array


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"a holds {len(a)} items and b {len(b)}: send the same number")
    return a, b


class RequestHandlers:
    """The functions bound to the two models, over one ``Engine``.

    Args:
        engine: a ``cleandift_rt.Engine`` (thread-safe; both models share it).
        match_tap: the tap ``cleandift_match`` uses for images when a request names none (default: us6
            when the engine has it, else its first tap).
    """

    def __init__(self, engine, match_tap: str | None = None):
        self.engine = engine
        self.outputs = tuple(engine.taps)
        self.match_tap = match_tap or (DEFAULT_TAP if DEFAULT_TAP in self.outputs else self.outputs[0])
        self._check_tap(self.match_tap)

    def _check_tap(self, tap) -> str:
        if not isinstance(tap, str) or tap not in self.outputs:
            raise ValueError(f"unknown tap {tap!r}: this server's engine has {', '.join(self.outputs)}")
        return tap

    def _wanted(self, request) -> tuple[str, ...]:
        names = list(request.requested_output_names or ())
        return tuple(names) if names else self.outputs

    def features(self, requests) -> list[dict]:
        """``cleandift``: the requested taps of every request's images, one engine call per image size."""
        jobs = [(check_images(r.data.get(IMAGES), IMAGES), self._wanted(r)) for r in requests]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, (images, _) in enumerate(jobs):
            by_size.setdefault(images.shape[1:3], []).append(i)
        replies: list[dict] = [{} for _ in requests]
        for members in by_size.values():
            taps = [t for t in self.outputs if any(t in jobs[i][1] for i in members)]
            batch = np.concatenate([jobs[i][0] for i in members]) if len(members) > 1 else jobs[members[0]][0]
            feats = self.engine.extract(batch, taps=taps)
            start = 0
            for i in members:
                count = len(jobs[i][0])
                replies[i] = {t: np.ascontiguousarray(feats[t][start:start + count], dtype=np.float32)
                              for t in jobs[i][1]}
                start += count
        return replies

    def match(self, requests) -> list[dict]:
        """``cleandift_match``: nearest neighbours of a's cells among b's, per request."""
        return [self._match_one(r) for r in requests]

    def _match_one(self, request) -> dict:
        data, parameters = request.data, request.parameters or {}
        unknown = sorted(set(parameters) - {PARAM_TAP, PARAM_MUTUAL})
        if unknown:
            raise ValueError(f"unknown parameters {unknown}: cleandift_match takes {PARAM_TAP!r} and {PARAM_MUTUAL!r}")
        mutual = parse_mutual(parameters.get(PARAM_MUTUAL, False))
        given_images = [n for n in (IMAGES_A, IMAGES_B) if n in data]
        given_features = [n for n in (FEATURES_A, FEATURES_B) if n in data]
        if given_images and given_features:
            raise ValueError(f"send {IMAGES_A} and {IMAGES_B}, or {FEATURES_A} and {FEATURES_B}, not both kinds")
        if given_images:
            a, b = _pair(check_images(data.get(IMAGES_A), IMAGES_A), check_images(data.get(IMAGES_B), IMAGES_B))
            tap = self._check_tap(parameters.get(PARAM_TAP, self.match_tap))
            a, b = self._extract_pair(a, b, tap)
        elif given_features:
            if PARAM_TAP in parameters:
                raise ValueError(f"parameter {PARAM_TAP!r} chooses the tap of images; feature maps are matched as sent")
            a, b = _pair(check_features(data.get(FEATURES_A), FEATURES_A),
                         check_features(data.get(FEATURES_B), FEATURES_B))
        else:
            raise ValueError(f"send {IMAGES_A} and {IMAGES_B} (UINT8 [B, H, W, 3]) or {FEATURES_A} and {FEATURES_B} "
                             "(FP32 [B, C, h, w])")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"feature maps of a have {a.shape[1]} channels and those of b {b.shape[1]}: "
                             "match maps of one tap")
        index, similarity = match(np.ascontiguousarray(a), np.ascontiguousarray(b), mutual=mutual)
        return {INDEX: np.asarray(index, dtype=np.int64), SIMILARITY: np.asarray(similarity, dtype=np.float32)}

    def _extract_pair(self, a: np.ndarray, b: np.ndarray, tap: str) -> tuple[np.ndarray, np.ndarray]:
        if a.shape == b.shape:  # one engine call for both
            feats = self.engine.extract(np.concatenate([a, b]), taps=[tap])[tap]
            return feats[:len(a)], feats[len(a):]
        return self.engine.extract(a, taps=[tap])[tap], self.engine.extract(b, taps=[tap])[tap]
