"""The served families' deployments and the front's answer for a family that is not deployed.

These import Ray Serve (the deployments are Serve objects) but start no Ray: the front's
FastAPI app is called through ASGI directly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.families import SERVED


def test_each_family_deploys_under_its_deployment_name() -> None:
    for family in SERVED.values():
        deployment = family.server_class()
        assert deployment.name == family.deployment
        assert deployment.func_or_class.kind == family.name


def _asgi_request(app: Any, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request through the ASGI app itself (no server, no Ray)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [], "server": ("test", 80),
             "client": ("test", 1)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_front_answers_404_for_each_family_that_is_not_deployed(method: str) -> None:
    from serve_app.front import app

    for family in SERVED.values():
        for path in (family.api_prefix, family.api_prefix + "/anything"):
            status, body = _asgi_request(app, method, path)
            assert status == 404, (path, body)
            assert body["error"]["code"] == "model_not_found"
            assert family.name in body["error"]["message"]
