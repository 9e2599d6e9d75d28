"""What an embedded server exposes, without Ray: the body drain, the metrics relay and the
HAProxy launcher's bind rewrites (the sockets themselves: tests/integration/
test_listening_sockets.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_app.body_drain import DrainUnreadBody
from serve_app.dataplane import HAPROXY_LAUNCHER, free_port
from serve_app.metrics_relay import MetricsRelay


def _scope(headers: dict[str, str], method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": "/v1/classify",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}


async def _refusing_app(scope, receive, send) -> None:
    """Answers 413 at once, as a route does for a too-large Content-Length."""
    await send({"type": "http.response.start", "status": 413, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _run(scope: dict, chunks: list[bytes], cap: int = 1 << 20) -> tuple[int, list[str]]:
    """Runs the middleware over ``_refusing_app``: (chunks received, event order)."""
    events: list[str] = []
    pending = list(chunks)

    async def receive() -> dict:
        body = pending.pop(0)
        events.append("receive")
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        events.append(message["type"])

    asyncio.run(DrainUnreadBody(_refusing_app, cap=cap)(scope, receive, send))
    return len(chunks) - len(pending), events


def test_an_unread_body_is_drained_before_the_response_starts() -> None:
    chunks = [b"x" * 1000] * 5
    read, events = _run(_scope({"content-length": "5000"}), chunks)
    assert read == 5
    assert events.index("http.response.start") > max(
        i for i, e in enumerate(events) if e == "receive")


def test_a_chunked_body_is_drained_too() -> None:
    read, _ = _run(_scope({"transfer-encoding": "chunked"}), [b"x" * 100] * 4)
    assert read == 4


def test_draining_stops_at_the_cap() -> None:
    read, events = _run(_scope({"transfer-encoding": "chunked"}), [b"x" * 100] * 10, cap=250)
    assert read == 3  # 300 bytes read: past the cap, the rest is left (the client gets a reset)
    assert "http.response.start" in events


def test_a_declared_length_over_the_cap_is_not_read_at_all() -> None:
    read, events = _run(_scope({"content-length": str(10 << 20)}), [b"x"] * 3, cap=1 << 20)
    assert read == 0 and events[0] == "http.response.start"


def test_a_request_without_a_body_is_never_waited_on() -> None:
    read, events = _run(_scope({}, method="GET"), [b""])
    assert read == 0 and "receive" not in events


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"# TYPE ray_up gauge\nray_up 1\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_the_relay_serves_metrics_and_nothing_else(upstream) -> None:
    port = free_port()
    relay = MetricsRelay("127.0.0.1", port, upstream.server_address[1]).start()
    try:
        status, kind, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert (status, body) == (200, "# TYPE ray_up gauge\nray_up 1\n")
        assert kind.startswith("text/plain; version=0.0.4")
        assert _get(f"http://127.0.0.1:{port}/")[0] == 404
        assert _get(f"http://127.0.0.1:{port}/api/jobs/")[0] == 404
    finally:
        relay.close()


def test_the_relay_says_502_when_ray_does_not_answer() -> None:
    port = free_port()
    relay = MetricsRelay("127.0.0.1", port, free_port()).start()  # nothing listens upstream
    try:
        status, _, body = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        relay.close()
    assert status == 502 and "did not answer" in body


TEMPLATE = """\
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
    mode http
backend classifier
    server r1 127.0.0.1:30000
listen stats
  bind *:8404
  stats enable
"""


def _launch(tmp_path: Path, **env: str) -> str:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(TEMPLATE)
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("MVE_HAPROXY")},
            "MVE_HAPROXY_BINARY": "/bin/true", **env}
    subprocess.run(["sh", str(HAPROXY_LAUNCHER), "-f", str(cfg)], env=full, check=True)
    return cfg.read_text()


def test_the_launcher_moves_admin_binds_and_the_frontend_on_request(tmp_path) -> None:
    out = _launch(tmp_path, MVE_HAPROXY_ADMIN_HOST="127.0.0.1",
                  MVE_HAPROXY_FRONTEND_HOST="0.0.0.0")
    assert "    bind 127.0.0.1:9101\n" in out and "  bind 127.0.0.1:8404\n" in out
    assert "    bind 0.0.0.0:8000\n" in out
    assert "server r1 127.0.0.1:30000" in out  # backends untouched


def test_the_launcher_leaves_binds_alone_on_a_cluster(tmp_path) -> None:
    assert _launch(tmp_path) == TEMPLATE
