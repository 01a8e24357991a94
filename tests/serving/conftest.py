"""Servers for the serving tests: where their Python comes from, starting them, watching them stop.

The server needs numpy < 2 (PyTriton), this environment has numpy 2: the server runs from a layered
environment (``cleandift-rt serve-env``) built once in the cache folder, or from the Python named by
``CLEANDIFT_SERVE_PYTHON``, or from this interpreter when it can serve. Clients run here.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from servers import ServerProcess, free_ports

HERE = Path(__file__).resolve().parent


def _can_serve_here() -> bool:
    try:
        from cleandift_rt.serving.environment import check_server_python

        check_server_python()
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="session")
def server_python() -> str:
    """A Python that can run ``cleandift-rt serve`` (built on first use; the tests skip when it cannot be)."""
    named = os.environ.get("CLEANDIFT_SERVE_PYTHON")
    if named:
        return named
    if _can_serve_here():
        return sys.executable
    from cleandift_rt.serving.environment import default_layered_dir, layered_env

    try:
        return str(layered_env(default_layered_dir(), log=lambda line: print(line, file=sys.stderr)))
    except (OSError, RuntimeError, ValueError) as exc:
        pytest.skip(f"no server environment (numpy<2 + PyTriton) could be built: {str(exc).splitlines()[0]}")


@pytest.fixture(scope="session")
def start_server(server_python, tmp_path_factory):
    """``start_server(*serve_args)`` runs ``cleandift-rt serve`` (or, with ``driver=``, a test driver) on free
    loopback ports; every server still running at the end of the session is stopped."""
    started: list[ServerProcess] = []

    def start(*args: str, driver: str | None = None) -> ServerProcess:
        http, grpc, metrics = free_ports(3)
        ports = {"http": http, "grpc": grpc, "metrics": metrics}
        flags = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
        head = [server_python, str(HERE / driver)] if driver else [server_python, "-m", "cleandift_rt.cli", "serve"]
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess([*head, *args, *flags], log, ports)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGTERM, timeout=30)
