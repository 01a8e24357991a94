"""The serving pieces that need no server: request handling against the in-process Engine, the error
text a client reads, the libpython decision, port checks, the client's input conversion."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

import cleandift_rt as cd
from cleandift_rt.features.preprocess import rgb8
from cleandift_rt.serving import environment
from cleandift_rt.serving.client import Client, as_images
from cleandift_rt.serving.handlers import RequestHandlers
from cleandift_rt.serving.protocol import exception_in
from cleandift_rt.serving.server import _stop_on_signals, check_ports_free


@dataclass
class Request:
    """What PyTriton hands the bound function per request (``pytriton.proxy.types.Request``'s fields)."""

    data: dict
    parameters: dict = field(default_factory=dict)
    requested_output_names: list = field(default_factory=list)


@pytest.fixture(scope="module")
def handlers(subset_engine):
    return RequestHandlers(subset_engine)


def test_features_one_engine_call_per_size_each_request_its_taps(handlers, subset_engine, batch):
    a, b = np.stack([batch[0], batch[0]]), np.stack([batch[0]])  # one size: one engine call
    c = np.stack([batch[1]])  # another size
    replies = handlers.features([Request({"images": a}, requested_output_names=["us6"]),
                                 Request({"images": b}), Request({"images": c}, requested_output_names=["us3"])])
    assert [sorted(r) for r in replies] == [["us6"], ["us3", "us6"], ["us3"]]
    for reply, images in zip(replies, (a, b, c)):
        want = subset_engine.extract(images)
        for tap, value in reply.items():
            assert value.dtype == np.float32 and value.flags.c_contiguous
            np.testing.assert_array_equal(value, want[tap])


def test_match_images_and_feature_maps(handlers, subset_engine, batch):
    a, b = np.stack([batch[0]]), np.stack([batch[2]])
    feats = subset_engine.extract([batch[0], batch[2]])
    (reply,) = handlers.match([Request({"images_a": a, "images_b": b})])
    index, similarity = cd.match(feats["us6"][:1], feats["us6"][1:])
    np.testing.assert_array_equal(reply["index"], index)
    np.testing.assert_array_equal(reply["similarity"], similarity)
    assert reply["index"].dtype == np.int64 and reply["similarity"].dtype == np.float32
    (reply,) = handlers.match([Request({"images_a": a, "images_b": b}, {"tap": "us3", "mutual": True})])
    np.testing.assert_array_equal(reply["index"], cd.match(feats["us3"][:1], feats["us3"][1:], mutual=True)[0])
    maps = feats["us3"]
    (reply,) = handlers.match([Request({"features_a": maps[:1], "features_b": maps[1:]}, {"mutual": "false"})])
    np.testing.assert_array_equal(reply["index"], cd.match(maps[:1], maps[1:])[0])


@pytest.mark.parametrize("request_, says", [
    (Request({"images": np.zeros((1, 32, 32, 3), np.uint8)}), "at least 64 px"),
    (Request({"images": np.zeros((1, 64, 64, 3), np.float32)}), "must be UINT8"),
    (Request({}), "input 'images' is missing"),
])
def test_feature_requests_refused(handlers, request_, says):
    with pytest.raises(ValueError, match=says):
        handlers.features([request_])


def test_match_requests_refused(handlers, monkeypatch):
    img = np.zeros((1, 64, 64, 3), np.uint8)
    maps = np.ones((1, 4, 2, 2), np.float32)
    cases = [
        (Request({"images_a": img}), "'images_b' is missing"),
        (Request({"images_a": img, "features_b": maps}), "not both kinds"),
        (Request({}), "send images_a and images_b"),
        (Request({"images_a": img, "images_b": img}, {"tap": "us9"}), "unknown tap 'us9'.*us3, us6"),
        (Request({"images_a": img, "images_b": img}, {"k": 2}), r"unknown parameters \['k'\]"),
        (Request({"images_a": img, "images_b": img}, {"mutual": "maybe"}), "must be true or false"),
        (Request({"images_a": img, "images_b": np.repeat(img, 2, 0)}), "a holds 1 items and b 2"),
        (Request({"features_a": maps, "features_b": np.ones((1, 5, 2, 2), np.float32)}), "4 channels and those of b 5"),
        (Request({"features_a": maps, "features_b": maps}, {"tap": "us6"}), "feature maps are matched as sent"),
        (Request({"features_a": maps * np.nan, "features_b": maps}), "NaN"),
    ]
    for request_, says in cases:
        with pytest.raises(ValueError, match=says):
            handlers.match([request_])
    monkeypatch.setenv("CLEANDIFT_MAX_IMAGE_PIXELS", str(64 * 64 - 1))
    with pytest.raises(ValueError, match="exceed the server's 4095 pixels"):
        handlers.match([Request({"images_a": img, "images_b": img})])


def test_unknown_match_tap_refused_at_start(subset_engine):
    with pytest.raises(ValueError, match="unknown tap 'mid'"):
        RequestHandlers(subset_engine, match_tap="mid")


def test_exception_line_of_a_server_error():
    pytriton_text = ('Traceback (most recent call last):\n  File "x.py", line 3, in f\n    raise ValueError("a")\n'
                     "ValueError: image 0 is 10x10 pixels: images must be at least 64 px\n\n\nAt:\n"
                     "  model.py(501): execute")
    assert exception_in(pytriton_text) == ("ValueError", "image 0 is 10x10 pixels: images must be at least 64 px")
    assert exception_in("[StatusCode.INVALID_ARGUMENT] inference request batch-size must be <= 8") is None


def test_libpython_decision(monkeypatch, tmp_path):
    own, system, stub = tmp_path / "own.so", tmp_path / "system.so", tmp_path / "stub"
    for f in (own, system, stub):
        f.write_bytes(b"x")
    monkeypatch.setattr(environment, "stub_path", lambda: stub)
    monkeypatch.setattr(environment, "_own_libpython", lambda: own)
    monkeypatch.setattr(environment, "resolved_libpython", lambda s, env: system)
    env = {"LD_LIBRARY_PATH": "/opt/lib"}
    note = environment.libpython_fix(env)
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path}:/opt/lib" and str(system) in note
    monkeypatch.setattr(environment, "resolved_libpython", lambda s, env: own)
    env = {}
    assert environment.libpython_fix(env) is None and env == {}  # the loader already finds this interpreter's
    monkeypatch.setattr(environment, "_own_libpython", lambda: None)
    monkeypatch.setattr(environment, "resolved_libpython", lambda s, env: None)
    with pytest.raises(RuntimeError, match="needs a shared libpython"):
        environment.libpython_fix({})


def test_check_server_python_names_the_fix():
    try:
        environment.check_server_python()
    except RuntimeError as exc:  # this environment has numpy 2 or no PyTriton
        assert "serve-env" in str(exc) and "docs/serving.md" in str(exc)
    else:
        import numpy

        assert int(numpy.__version__.split(".")[0]) < 2


def test_sigint_and_sigterm_ask_the_server_to_stop():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        stop = threading.Event()
        with _stop_on_signals(stop):
            os.kill(os.getpid(), sig)  # delivered to this (the main) thread before kill returns
            assert stop.wait(5)
        assert {s: signal.getsignal(s) for s in before} == before


def test_ports_in_use_and_repeated_are_refused():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port} for grpc.*--grpc-port"):
            check_ports_free("127.0.0.1", {"http": port + 1 if port < 65535 else port - 1, "grpc": port})
    with pytest.raises(ValueError, match="must differ"):
        check_ports_free("127.0.0.1", {"http": 9000, "grpc": 9000})


def test_client_inputs(photos):
    pil = photos[sorted(photos)[0]].convert("P")  # converted exactly as Engine.extract converts it
    (array,) = as_images(pil)
    np.testing.assert_array_equal(array, np.asarray(rgb8(pil)))
    assert len(as_images(np.zeros((3, 64, 64, 3), np.uint8))) == 3
    with pytest.raises(TypeError, match="uint8 RGB images"):
        as_images(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        as_images([np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="without a scheme"):
        Client("http://127.0.0.1:8000", protocol="http")
    with pytest.raises(ValueError, match="protocol"):
        Client("127.0.0.1:8001", protocol="rest")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_without_a_server(protocol):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    client = Client(f"127.0.0.1:{port}", protocol=protocol, timeout=5)
    assert client.ready() is False
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        client.extract(np.zeros((64, 64, 3), np.uint8))
