"""A small HTTP client for the mve serving API (stdlib ``urllib`` only; never imports Ray).

    from serve_app.client import MveClient
    client = MveClient("http://127.0.0.1:8000", api_key=None)
    client.classify([open("cat.png", "rb").read()], top_k=3)["predictions"][0]["label"]
    open("grid.png", "wb").write(client.sample(n=16, seed=0))

The API key defaults to ``$MVE_API_KEY``; the URL to ``$MVE_URL`` or ``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from mve.errors import UserError

__all__ = ["DEFAULT_URL", "ClientError", "MveClient", "default_url"]

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    """``$MVE_URL`` or ``http://127.0.0.1:8000``."""
    return os.environ.get("MVE_URL") or DEFAULT_URL


class ClientError(UserError):
    """An error answer (``status``, ``code``) or an unreachable server (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message


class MveClient:
    """Calls the ``/v1`` routes of an mve server."""

    def __init__(self, url: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("MVE_API_KEY") or None
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str | None = None,
                 query: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        headers: dict[str, str] = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)["error"]
                code, msg = (err["code"], err["message"]) if isinstance(err, dict) else (
                    "error", str(err))
            except (ValueError, KeyError, TypeError):
                code, msg = "http_error", raw[:200].decode("utf-8", "replace") or exc.reason
            raise ClientError(exc.code, code, msg) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(0, "unreachable", f"cannot reach {self.url}: {reason}") from None

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None,
              query: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps(payload).encode() if payload is not None else None
        raw, _ = self._request(method, path, body, "application/json" if body else None, query)
        return json.loads(raw)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        return self._json("GET", "/v1/models")

    def classify(self, images: list[bytes], *, top_k: int = 5) -> dict[str, Any]:
        """``POST /v1/classify`` with base64 JSON; returns the response JSON."""
        return self._json("POST", "/v1/classify", {"images": [_b64(i) for i in images],
                                                   "top_k": top_k})

    def sample(self, *, n: int = 16, temperature: float = 1.0, seed: int | None = None,
               steps: int | None = None) -> bytes:
        """``POST /v1/vae/sample``: a PNG (one image, or a grid of ``n``); ``steps`` for a
        diffusion prior."""
        payload = {"n": n, "temperature": temperature, "seed": seed}
        if steps is not None:
            payload["steps"] = steps
        raw, _ = self._request("POST", "/v1/vae/sample", json.dumps(payload).encode(),
                               "application/json", {"format": "png"})
        return raw

    def sample_images(self, *, n: int = 16, temperature: float = 1.0,
                      seed: int | None = None) -> list[bytes]:
        """``n`` samples as separate PNGs."""
        out = self._json("POST", "/v1/vae/sample", {"n": n, "temperature": temperature,
                                                    "seed": seed}, {"format": "json"})
        return [base64.b64decode(s) for s in out["images"]]

    def variations(self, image: bytes, *, n: int = 8, temperature: float = 1.0,
                   seed: int | None = None) -> bytes:
        """``POST /v1/vae/variations``: a PNG grid."""
        raw, _ = self._request("POST", "/v1/vae/variations", json.dumps({
            "image": _b64(image), "n": n, "temperature": temperature, "seed": seed}).encode(),
            "application/json", {"format": "png"})
        return raw

    def reconstruct(self, images: list[bytes]) -> bytes:
        """``POST /v1/vae/reconstruct``: a PNG (grid for several images)."""
        raw, _ = self._request("POST", "/v1/vae/reconstruct", json.dumps({
            "images": [_b64(i) for i in images]}).encode(), "application/json",
            {"format": "png"})
        return raw

    def interpolate(self, a: bytes, b: bytes, *, steps: int = 8) -> bytes:
        """``POST /v1/vae/interpolate``: a PNG strip of ``steps`` images."""
        raw, _ = self._request("POST", "/v1/vae/interpolate", json.dumps({
            "images": [_b64(a), _b64(b)], "steps": steps}).encode(), "application/json",
            {"format": "png"})
        return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
