"""The HTTP server: ``SimulatorServer`` and ``start``."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .common import Response, _text_response
from .simulator import Simulator

# --------------------------------------------------------------------------------------------------
# HTTP server


class _Handler(BaseHTTPRequestHandler):
    # Answer without waiting for a delayed ACK (Nagle): otherwise each keep-alive request stalls ~40 ms.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "hl-sim/1.0"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are dropped after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _send(self, resp: Response) -> None:
        if resp.drop:
            self.close_connection = True
            return
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] in ("/", "/health"):
            self._send(Response(200, "text/plain", b"ok"))
        else:
            self._send(_text_response("Not Found", 404))

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        sim: Simulator = self.server.simulator  # type: ignore[attr-defined]
        self._send(sim.handle(self.path, raw))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # a run opens up to 16 connections at once; the default backlog (5) drops SYNs

    def __init__(self, addr: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SimulatorServer:
    """A Simulator served over HTTP on ``host:port`` (port 0 = a free one).

    ``url`` is "http://127.0.0.1:PORT" (pass it as the SDK's base_url).  Unknown attributes are forwarded to
    the Simulator, so ``server.open_position(...)`` works; ``server.sim`` is the Simulator itself.
    Context manager: starts on enter, stops on exit.
    """

    def __init__(self, simulator: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
                 latency_ms: Any = None) -> None:
        self.sim = simulator if simulator is not None else Simulator()
        if latency_ms is not None:
            self.sim.set_latency(latency_ms)
        self.host = host
        self.port = int(port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "SimulatorServer":
        if self._httpd is not None:
            return self
        self.sim._wake.clear()
        self._httpd = _HTTPServer((self.host, self.port), self.sim)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hl-sim:{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.sim._wake.set()  # end hangs and latency sleeps
        self.sim._gate.set()
        httpd.shutdown()
        httpd.close_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "SimulatorServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getattr__(self, name: str) -> Any:
        if name == "sim":  # not yet set (during __init__)
            raise AttributeError(name)
        return getattr(self.sim, name)


def start(simulator: Simulator | None = None, host: str = "127.0.0.1", port: int = 0,
          latency_ms: Any = None) -> SimulatorServer:
    """Start a SimulatorServer and return it (call .stop() when done)."""
    return SimulatorServer(simulator, host, port, latency_ms).start()
