"""ASGI middleware: a response sent before the request body was read waits until it is.

Why: a route that refuses a body (413 over ``max_body_bytes``, 401 without a key, 404) answers
without reading it. The HTTP server then closes the connection with the unread bytes in its
receive buffer, and the kernel answers that with a TCP reset. A client that sends its whole
body before it reads the response (Python's ``urllib`` and ``http.client``) gets the reset,
not the JSON error. Reading and discarding the rest of the body first lets every client read
the answer. The discarded bytes are never kept, and past :data:`DRAIN_CAP` the middleware
stops reading: a client that sends more than that gets the reset.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DRAIN_CAP", "DrainUnreadBody"]

DRAIN_CAP = 64 * 1024 * 1024  # bytes read and dropped at most, per request


def _expects_body(scope: dict[str, Any]) -> tuple[bool, int | None]:
    """Whether the request has a body, and its declared length (None when chunked)."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            return False, None  # the route answers 400; nothing sensible to drain
        return declared > 0, declared
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower(), None


class DrainUnreadBody:
    """Before ``http.response.start``, reads what is left of the request body (up to
    :data:`DRAIN_CAP` bytes in all) so that the connection can close cleanly."""

    def __init__(self, app: Any, cap: int = DRAIN_CAP) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        has_body, declared = _expects_body(scope)
        if not has_body:  # nothing to drain: no wrappers on the request's path
            return await self.app(scope, receive, send)
        state = {"done": False, "read": 0}

        async def tracked_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                state["done"] = True
            return message

        async def draining_send(message: dict) -> None:
            if message["type"] == "http.response.start" and not state["done"]:
                if declared is None or declared <= self.cap:
                    while not state["done"] and state["read"] <= self.cap:
                        await tracked_receive()
            await send(message)

        await self.app(scope, tracked_receive, draining_send)
