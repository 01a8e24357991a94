"""``cleandift-rt serve``: an Engine behind NVIDIA Triton's HTTP / gRPC protocol, on PyTriton.

PyTriton starts the ``tritonserver`` it bundles (Python backend only) and hands every batch Triton's
dynamic batcher forms to a function of this process (``handlers.RequestHandlers``), which runs the
Engine. The models and their tensors are described in ``protocol``. The server binds loopback
unless told otherwise, stops cleanly on SIGINT and SIGTERM (Triton, its Python-backend stubs, their
shared memory and the workspace go with it) and must run in a Python with numpy < 2
(``environment``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .environment import check_server_python, libpython_fix
from .handlers import RequestHandlers
from .protocol import (
    FEATURES_A,
    FEATURES_B,
    FEATURES_MODEL,
    IMAGES,
    IMAGES_A,
    IMAGES_B,
    INDEX,
    MATCH_MODEL,
    SIMILARITY,
)

SHUTDOWN_SECONDS = 5  # in-flight requests get this long to finish once a stop is asked for


@dataclass
class ServeOptions:
    """Where the server listens and how it batches."""

    max_batch: int
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    queue_delay_us: int = 1000  # how long the dynamic batcher waits to fill a batch
    dynamic_batching: bool = True
    match_tap: str | None = None

    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse ports another process holds before Triton starts (its own error comes late and buried)."""
    if len(set(ports.values())) != len(ports):
        raise ValueError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
    for name, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton does: TIME_WAIT is no obstacle
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {host}:{port} for {name} ({exc.strerror}): pass another "
                                 f"--{name}-port") from None


def output_shape(engine, name: str) -> tuple[int, ...]:
    """(C, h, w) of one output at the engine's size; -1 where the file does not say."""
    info = engine.backend.info
    if name in info.output_names:
        return tuple(int(v) for v in info.output_shape(name, *engine.size))
    return (-1, -1, -1)


def serve(engine, options: ServeOptions, log=print) -> int:
    """Serve ``engine`` until SIGINT or SIGTERM; returns 0 after a clean stop."""
    check_server_python()
    note = libpython_fix()
    if note:
        log(f"serve: {note}")
    check_ports_free(options.host, options.ports())
    handlers = RequestHandlers(engine, options.match_tap)

    from pytriton.exceptions import PyTritonError
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    logging.getLogger("pytriton").setLevel(logging.WARNING)
    stop = threading.Event()
    workdir = Path(tempfile.mkdtemp(prefix="cleandift-serve-"))
    triton_log = workdir / "tritonserver.log"  # Triton's own log, shown when it fails
    config = TritonConfig(http_address=options.host, grpc_address=options.host, metrics_address=options.host,
                          http_port=options.http_port, grpc_port=options.grpc_port,
                          metrics_port=options.metrics_port, allow_gpu_metrics=False,
                          exit_timeout_secs=SHUTDOWN_SECONDS, log_verbose=0, log_file=triton_log)
    batcher = DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us) if options.dynamic_batching else None
    model_config = ModelConfig(max_batch_size=options.max_batch, batcher=batcher)
    image = (-1, -1, 3)
    with _stop_on_signals(stop):
        try:
            with Triton(config=config, workspace=workdir / "workspace") as triton:
                triton.bind(model_name=FEATURES_MODEL, infer_func=handlers.features,
                            inputs=[Tensor(name=IMAGES, dtype=np.uint8, shape=image)],
                            outputs=[Tensor(name=t, dtype=np.float32, shape=output_shape(engine, t))
                                     for t in handlers.outputs],
                            config=model_config)
                triton.bind(model_name=MATCH_MODEL, infer_func=handlers.match,
                            inputs=[Tensor(name=IMAGES_A, dtype=np.uint8, shape=image, optional=True),
                                    Tensor(name=IMAGES_B, dtype=np.uint8, shape=image, optional=True),
                                    Tensor(name=FEATURES_A, dtype=np.float32, shape=(-1, -1, -1), optional=True),
                                    Tensor(name=FEATURES_B, dtype=np.float32, shape=(-1, -1, -1), optional=True)],
                            outputs=[Tensor(name=INDEX, dtype=np.int64, shape=(-1,)),
                                     Tensor(name=SIMILARITY, dtype=np.float32, shape=(-1,))],
                            config=model_config)
                try:
                    triton.run()
                except PyTritonError as exc:
                    raise RuntimeError(f"the Triton server did not start ({exc}){_tail(triton_log)}") from None
                log(ready_line(engine, handlers, options))
                while not stop.wait(0.5):
                    if not triton.is_alive():
                        raise RuntimeError(f"the Triton server stopped by itself{_tail(triton_log)}")
            log("serve: stopped")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "; its log ends:\n  " + "\n  ".join(text) if text else ""


def ready_line(engine, handlers: RequestHandlers, options: ServeOptions) -> str:
    ports = options.ports()
    batching = (f"dynamic batching up to {options.max_batch}, queue delay {options.queue_delay_us} us"
                if options.dynamic_batching else f"batches up to {options.max_batch} per request, no dynamic batching")
    return (f"serve: ready (pid {os.getpid()}): models {FEATURES_MODEL} (taps {', '.join(handlers.outputs)}; "
            f"{engine.size[0]}x{engine.size[1]}, {engine.resize}) and {MATCH_MODEL} (tap {handlers.match_tap}); "
            + ", ".join(f"{k} {options.host}:{v}" for k, v in ports.items()) + f"; {batching}")


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM set ``stop`` (a server started in the background from a shell ignores SIGINT
    unless a handler is installed); the previous handlers come back afterwards."""
    def handler(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
