"""``mve serve --metrics-host``: the embedded Ray's Prometheus endpoint on a wider address.

An embedded Ray binds everything to loopback, its metrics export port included (Ray derives
every bind address from the node address, so it cannot widen one port alone). A Prometheus
in a container, or on another machine, needs ``/metrics`` on an address it can reach: this
relay listens there and answers ``GET /metrics`` (and nothing else) with what Ray's loopback
endpoint returns, fetched afresh on each scrape.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["MetricsRelay"]

_TIMEOUT_S = 10.0  # below Prometheus's default scrape timeout


class _Handler(BaseHTTPRequestHandler):
    upstream: str  # set on the subclass made per relay

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] != "/metrics":
            self._reply(404, b"only /metrics is served here\n", "text/plain")
            return
        try:
            with urllib.request.urlopen(self.upstream, timeout=_TIMEOUT_S) as resp:
                body, kind = resp.read(), resp.headers.get("Content-Type", "text/plain")
        except (urllib.error.URLError, OSError) as exc:
            self._reply(502, f"Ray's metrics endpoint did not answer: {exc}\n".encode(),
                        "text/plain")
            return
        self._reply(200, body, kind)

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per scrape would bury mve serve's console


class MetricsRelay:
    """Serves ``http://host:port/metrics`` from ``http://127.0.0.1:upstream_port/metrics``
    on a daemon thread until :meth:`close`."""

    def __init__(self, host: str, port: int, upstream_port: int) -> None:
        handler = type("RelayHandler", (_Handler,),
                       {"upstream": f"http://127.0.0.1:{upstream_port}/metrics"})
        server = type("RelayServer", (ThreadingHTTPServer,),
                      {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._server = server((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="mve-metrics-relay")

    def start(self) -> MetricsRelay:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
