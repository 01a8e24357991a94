"""Test helper: one ``cleandift-rt serve`` process and what it leaves behind (processes, ports, shared
memory, workspaces), for tests/serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

READY = "serve: ready"


def shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def workspaces() -> set[Path]:
    """The servers' working folders (``serving.server``: a temporary folder per server)."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("cleandift-serve-*"))


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections of a stopped server may linger in TIME_WAIT: a new server
    may listen all the same, as SO_REUSEADDR lets it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServerProcess:
    """One server started for a test: its log, its process tree, its ports."""

    def __init__(self, argv: list[str], log: Path, ports: dict[str, int]):
        self.log, self.ports = log, ports
        self.shm_before, self.workspaces_before = shm_files(), workspaces()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.seen: set[int] = {self.proc.pid}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while READY not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the server did not get ready (exit status {self.proc.poll()}); its output:\n"
                            + self.text()[-3000:])
            time.sleep(0.2)
        self.descendants()
        return self

    def descendants(self) -> set[int]:
        """Every process under the server now (Triton, its Python-backend stubs), remembered for later checks."""
        tree, grew = {self.proc.pid}, True
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        while grew:
            grew = False
            for pid in pids:
                if pid not in tree and _parent(pid) in tree:
                    tree.add(pid)
                    grew = True
        self.seen |= tree
        return tree - {self.proc.pid}

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> float:
        """Seconds from the signal until the server and every process it started are gone (fails after
        ``timeout``, naming what is left)."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server was still running {timeout} s after signal {sig!r}")
        while True:
            left = [pid for pid in self.seen - {self.proc.pid} if alive(pid)]
            if not left:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                names = {pid: _command(pid) for pid in left}
                self.kill()
                pytest.fail(f"{timeout} s after signal {sig!r} these processes of the server were still running: "
                            f"{names}")
            time.sleep(0.1)

    def kill(self) -> None:
        """Last resort of a failing test: SIGKILL to the processes this server started, by id."""
        for pid in sorted(self.seen - {self.proc.pid}):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
