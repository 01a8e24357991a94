"""``Client``: features and matches from a ``cleandift-rt serve`` server, over gRPC or HTTP.

Binary tensors both ways (gRPC's raw contents; HTTP's binary extension, never JSON numbers), the
output convention of ``Engine.extract`` (``{tap: float32 [B, C, h, w]}``), images of different
sizes in one call (one request per size, answers in input order), batches split at the server's
maximum. Each thread gets its own connection, so one Client may be shared by threads.
"""

from __future__ import annotations

import threading

import numpy as np

from ..features.preprocess import rgb8
from ..taps import resolve_taps
from .protocol import (
    FEATURES_A,
    FEATURES_B,
    FEATURES_MODEL,
    IMAGES,
    IMAGES_A,
    IMAGES_B,
    INDEX,
    MATCH_MODEL,
    PARAM_MUTUAL,
    PARAM_TAP,
    SIMILARITY,
    TRITON_DTYPES,
    exception_in,
)

PROTOCOLS = ("grpc", "http")
_RAISED_AS = {"ValueError": ValueError, "TypeError": TypeError}


class ServerError(RuntimeError):
    """The server failed a request for a reason other than the request itself (an engine failure)."""


def _tritonclient(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise ImportError('the serving client needs tritonclient: pip install "cleandift-rt[client]" '
                          '(or "tritonclient[grpc,http]")') from None
    return module, InferenceServerException


def as_images(images, what: str = "images") -> list[np.ndarray]:
    """PIL images, uint8 H x W x 3 arrays (or one N x H x W x 3 array) -> a list of uint8 H x W x 3 arrays
    (PIL images converted as ``Engine.extract`` converts them, so the server sees the same pixels)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"{what}: the server takes uint8 RGB images (H x W x 3 or N x H x W x 3), got dtype "
                            f"{images.dtype}; float NCHW pixels are for the in-process Engine")
        if images.ndim not in (3, 4):
            raise ValueError(f"{what}: uint8 images must be H x W x 3 or N x H x W x 3, got shape {images.shape}")
        images = [images] if images.ndim == 3 else list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError(f"{what}: empty batch: pass at least one image")
    out = []
    for i, img in enumerate(images):
        if hasattr(img, "mode") and hasattr(img, "convert"):  # PIL
            img = np.asarray(rgb8(img, f"{what} {i}"))
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise TypeError(f"{what} {i}: expected a PIL image or a uint8 H x W x 3 array, got "
                            f"{getattr(img, 'dtype', type(img).__name__)}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{what} {i}: uint8 arrays must be H x W x 3 RGB, got shape {img.shape}")
        out.append(np.ascontiguousarray(img))
    return out


def _feature_maps(x, what: str) -> np.ndarray | None:
    """Float feature maps as float32 numpy ``[B, C, h, w]``, or None when ``x`` is not float maps (images)."""
    if hasattr(x, "detach") and hasattr(x, "is_floating_point"):  # torch
        if not x.is_floating_point():
            return None
        x = x.detach().float().cpu().numpy()
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return None
    if x.ndim != 4:
        raise ValueError(f"{what}: feature maps must be [B, C, h, w], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _groups(keys: list) -> dict:
    """{key: [positions]} in first-seen order."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


class Client:
    """A client of ``cleandift-rt serve``.

    Args:
        url: ``"host:port"`` (tritonclient's form, no scheme): the server's gRPC port (default 8001)
            for ``protocol="grpc"``, its HTTP port (8000) for ``"http"``.
        protocol: ``"grpc"`` or ``"http"``.
        timeout: seconds a request (and, for HTTP, a connection) may take.
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", *, timeout: float = 120.0):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if "://" in str(url):
            raise ValueError(f"url {url!r}: give host:port without a scheme (tritonclient's form), e.g. 127.0.0.1:8001")
        self.url, self.protocol, self.timeout = str(url), protocol, float(timeout)
        self._module, self._error = _tritonclient(protocol)
        self._local = threading.local()
        self._facts: dict | None = None

    # -- connection and what the server offers -------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url)
            else:
                client = self._module.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                            network_timeout=self.timeout)
            self._local.client = client
        return client

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self._client(), method)(*args, **kwargs)
        except self._error as exc:
            raise self._translate(exc) from None
        except OSError as exc:  # HTTP: refused or reset connections
            raise ConnectionError(f"cannot reach a server at {self.url} over {self.protocol} ({exc}): is "
                                  "`cleandift-rt serve` running there?") from None

    def _translate(self, exc) -> Exception:
        text, status = str(exc.message() or exc), str(exc.status() or "")
        found = exception_in(text)
        if found:
            kind, message = found
            return _RAISED_AS.get(kind, ServerError)(f"server: {message}" if kind in _RAISED_AS
                                                     else f"server error ({kind}): {message}")
        if "UNAVAILABLE" in status or "failed to connect" in text.lower():
            return ConnectionError(f"cannot reach a server at {self.url} over {self.protocol}: {text}")
        if "INVALID_ARGUMENT" in status or status == "400":
            return ValueError(f"server refused the request: {text}")
        return ServerError(f"server error: {text}")

    def _facts_of_server(self) -> dict:
        if self._facts is None:
            json_kw = {"as_json": True} if self.protocol == "grpc" else {}
            metadata = self._call("get_model_metadata", FEATURES_MODEL, **json_kw)
            config = self._call("get_model_config", FEATURES_MODEL, **json_kw)
            config = config.get("config", config)
            self._facts = {"taps": tuple(o["name"] for o in metadata["outputs"]),
                           "max_batch": int(config.get("max_batch_size", config.get("maxBatchSize", 0))) or 1}
        return self._facts

    @property
    def taps(self) -> tuple[str, ...]:
        """The taps the server's engine gives (the ``cleandift`` model's outputs)."""
        return self._facts_of_server()["taps"]

    @property
    def max_batch(self) -> int:
        """The most images one request may hold (larger batches are split here)."""
        return self._facts_of_server()["max_batch"]

    def ready(self) -> bool:
        """True when the server and both models are ready."""
        try:
            return bool(self._call("is_server_ready") and self._call("is_model_ready", FEATURES_MODEL)
                        and self._call("is_model_ready", MATCH_MODEL))
        except ConnectionError:
            return False

    # -- requests -------------------------------------------------------------------------------

    def _input(self, name: str, array: np.ndarray):
        tensor = self._module.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype])
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def _output(self, name: str):
        if self.protocol == "http":
            return self._module.InferRequestedOutput(name, binary_data=True)
        return self._module.InferRequestedOutput(name)

    def _infer(self, model: str, inputs: dict, outputs, parameters=None) -> dict:
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {"timeout": int(self.timeout * 1e6)}
        if parameters:
            kwargs["parameters"] = parameters
        result = self._call("infer", model, [self._input(n, a) for n, a in inputs.items()],
                            outputs=[self._output(n) for n in outputs], **kwargs)
        return {n: result.as_numpy(n) for n in outputs}

    def extract(self, images, taps=None) -> dict[str, np.ndarray]:
        """``{tap: float32 [B, C, h, w]}`` for ``images`` (PIL images or uint8 H x W x 3 arrays, or one
        uint8 N x H x W x 3 array), as ``Engine.extract`` returns them; ``taps``: a name or names
        (default: all the server's)."""
        wanted = self._taps(taps)
        arrays = as_images(images)
        parts: dict[int, dict] = {}
        for members in _groups([a.shape for a in arrays]).values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                got = self._infer(FEATURES_MODEL, {IMAGES: np.stack([arrays[i] for i in chunk])}, wanted)
                for j, i in enumerate(chunk):
                    parts[i] = {t: got[t][j] for t in wanted}
        return {t: np.stack([parts[i][t] for i in range(len(arrays))]) for t in wanted}

    def _taps(self, taps) -> tuple[str, ...]:
        if taps is None:
            return self.taps
        wanted = resolve_taps(taps)
        missing = [t for t in wanted if t not in self.taps]
        if missing:
            raise ValueError(f"taps {missing} are not served here (the server's engine has {', '.join(self.taps)})")
        return wanted

    def match(self, a, b, *, tap: str | None = None, mutual: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(index int64 [B, N], similarity float32 [B, N])``: for each cell of a's feature map, the cell of
        b's it matches (``cleandift_rt.match`` on the server). ``a`` and ``b``: images (as for
        ``extract``; the server extracts ``tap``, default its match tap) or float ``[B, C, h, w]`` feature
        maps (numpy or torch). ``mutual``: -1 where the match is not mutual."""
        parameters = {PARAM_MUTUAL: bool(mutual)}
        fa, fb = _feature_maps(a, "a"), _feature_maps(b, "b")
        if (fa is None) != (fb is None):
            raise TypeError("a and b must both be images or both be float feature maps")
        if fa is not None:
            if tap is not None:
                raise ValueError("tap= chooses the tap of images; feature maps are matched as they are")
            pairs = [(fa[i], fb[i]) for i in range(len(fa))] if len(fa) == len(fb) else None
            names = (FEATURES_A, FEATURES_B)
        else:
            if tap is not None:
                parameters[PARAM_TAP] = self._taps(tap)[0]
            ia, ib = as_images(a, "a"), as_images(b, "b")
            pairs = list(zip(ia, ib)) if len(ia) == len(ib) else None
            names = (IMAGES_A, IMAGES_B)
        if pairs is None:
            raise ValueError(f"a and b must hold the same number of items, got {len(a)} and {len(b)}")
        index: dict[int, np.ndarray] = {}
        similarity: dict[int, np.ndarray] = {}
        for members in _groups([(x.shape, y.shape) for x, y in pairs]).values():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                inputs = {names[0]: np.stack([pairs[i][0] for i in chunk]),
                          names[1]: np.stack([pairs[i][1] for i in chunk])}
                got = self._infer(MATCH_MODEL, inputs, (INDEX, SIMILARITY), parameters)
                for j, i in enumerate(chunk):
                    index[i], similarity[i] = got[INDEX][j], got[SIMILARITY][j]
        order = range(len(pairs))  # every image becomes the engine's size: all rows have one length
        return np.stack([index[i] for i in order]), np.stack([similarity[i] for i in order])

    def close(self) -> None:
        """Close this thread's connection."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

