"""The explorer's web server: the standard library's threaded HTTP server, one page, a small JSON API.

Routes: ``GET /`` the page; ``GET /api/state``; ``GET /image/<id>`` the photo shown; ``POST /api/upload``
(the file's bytes as the body, its name in ``X-File-Name``); ``POST /api/pick``, ``/api/remove``,
``/api/prepare``, ``/api/click``, ``/api/track`` (JSON bodies). Every answer to a request that failed is
``{"error": message}``: the session's messages for what the page sent, one line for anything else
(the traceback goes to the server's log, never to the page), and the server keeps serving.

It listens where it is told, loopback by default; a request must name this server in its ``Host``
header (no DNS rebinding) and every ``POST`` must carry ``X-Explorer: 1``, which a cross-site form
cannot send, so another page open in the browser cannot drive it.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from .session import ExploreError, Session

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 64 * 2**20  # an upload above this is refused before it is read
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ExplorerServer(ThreadingHTTPServer):
    """The server of one :class:`Session`; ``port=0`` takes a free port (``url`` says which). ``session``
    may be set after the port is bound (None until then), as long as it is before ``serve_forever``.

    ``server_close`` ends every open connection and waits for its thread: a daemon thread still in an
    engine call (or blocked on a kept-alive browser connection) when Python exits is unwound inside
    native code, which aborts the process ("terminate called without an active exception")."""

    daemon_threads = False  # joined by server_close (block_on_close)

    def __init__(self, session: Session | None, host: str = "127.0.0.1", port: int = 0, tracking=None):
        self.session, self.tracking = session, tracking
        self.page = PAGE.read_bytes()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((host, port), Handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self._connections_lock:
            for connection in self._connections:  # a kept-alive connection's thread waits in recv: wake it
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().server_close()  # joins the request threads

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def allowed_hosts(self) -> set[str] | None:
        """The ``Host`` headers a loopback server answers (None: bound elsewhere on purpose, any)."""
        host, port = self.server_address[:2]
        if host not in LOOPBACK:
            return None
        return {f"{n}:{port}" for n in (*LOOPBACK, "[::1]")}


class Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # one line per request is noise in a terminal; errors are logged
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a browser closed a kept-alive connection (tab closed, browser quit)
            pass

    # -- answers -----------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, message: str, status: int = 400) -> None:
        self._json({"error": message}, status)

    def _guarded(self, route) -> None:
        """Run a route; what fails becomes a message on the page and the server goes on."""
        try:
            route()
        except ConnectionError:  # the page went away mid-answer: nobody to tell
            self.close_connection = True
        except ValueError as exc:  # ExploreError, and the library's own one-line messages (a tap the Tracker lacks)
            self._error(str(exc))
        except Exception as exc:  # a bug: the page gets one line, the log the traceback
            traceback.print_exc(file=sys.stderr)
            self._error(f"internal error ({type(exc).__name__}: {exc}); the server keeps running, details are in "
                        "its log", HTTPStatus.INTERNAL_SERVER_ERROR)

    # -- requests ----------------------------------------------------------------------------------

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts()
        if allowed is None or self.headers.get("Host", "") in allowed:
            return True
        self._error("unknown Host: open the explorer at the address it printed", HTTPStatus.FORBIDDEN)
        return False

    def do_GET(self):
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/state":
            self._guarded(lambda: self._json(self._state()))
        elif path.startswith("/image/"):
            self._guarded(lambda: self._send(200, self.server.session.display(_int(path[len("/image/"):])), "image/jpeg"))
        elif path.startswith("/frame/") and self.server.tracking is not None:
            self._guarded(lambda: self._send(200, self.server.tracking.frame(_int(path[len("/frame/"):])), "image/jpeg"))
        else:
            self._error(f"no such page {path}", HTTPStatus.NOT_FOUND)

    def do_POST(self):
        if not self._host_ok():
            return
        if self.headers.get("X-Explorer") != "1":
            self._error("requests must come from the explorer page (X-Explorer header missing)", HTTPStatus.FORBIDDEN)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error("the request has no Content-Length", HTTPStatus.LENGTH_REQUIRED)
            return
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body stays unread
            self._error(f"the upload is {length / 2**20:.0f} MB: the explorer takes files up to {MAX_BODY // 2**20} MB",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        body = self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        routes = {"/api/upload": lambda: self._upload(body), "/api/pick": lambda: self._call(body, self._pick),
                  "/api/remove": lambda: self._call(body, self._remove),
                  "/api/prepare": lambda: self._call(body, lambda a: self.server.session.prepare(a.get("recipe"))),
                  "/api/click": lambda: self._call(body, self._click)}
        if self.server.tracking is not None:
            routes["/api/track"] = lambda: self._call(body, self.server.tracking.track)
        if path in routes:
            self._guarded(routes[path])
        else:
            self._error(f"no such request {path}", HTTPStatus.NOT_FOUND)

    def _state(self) -> dict:
        state = self.server.session.describe()
        state["limits"]["upload_bytes"] = MAX_BODY
        state["tracking"] = None if self.server.tracking is None else self.server.tracking.describe()
        return state

    def _call(self, body: bytes, handler) -> None:
        try:
            args = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExploreError("the request body is not JSON") from None
        if not isinstance(args, dict):
            raise ExploreError("the request body must be a JSON object")
        self._json(handler(args))

    def _upload(self, body: bytes) -> None:
        name = unquote(self.headers.get("X-File-Name", "upload"))
        if not body:
            raise ExploreError(f"{name} is empty")
        added = self.server.session.add_image(name, body)
        self._json({"added": added, "state": self._state()})

    def _pick(self, args) -> dict:
        return {"added": self.server.session.pick(args.get("index")), "state": self._state()}

    def _remove(self, args) -> dict:
        self.server.session.remove(args.get("image"))
        return {"state": self._state()}

    def _click(self, args) -> dict:
        return self.server.session.click(args.get("recipe"), args.get("image"), args.get("x"), args.get("y"))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ExploreError(f"{text!r} is not an image number") from None
