"""The one error type of the serving API, and its JSON shapes.

Every rejected request becomes an :class:`ApiError` with an HTTP status, a stable
machine-readable ``code`` and a human message. The ingress renders it as
``{"error": {"code": ..., "message": ...}}`` on ``/v1`` routes, and as the Open Inference
Protocol's ``{"error": "<message>"}`` on ``/v2`` routes (what ``tritonclient`` parses).

The class pickles with its fields, so a model replica can raise it and the ingress gets
it back through a ``DeploymentHandle`` unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "error_body", "oip_error_body"]


class ApiError(Exception):
    """A client-visible error: HTTP ``status``, stable ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (ApiError, (self.status, self.code, self.message, self.headers))

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def error_body(code: str, message: str) -> dict[str, Any]:
    """The ``/v1`` error JSON."""
    return {"error": {"code": code, "message": message}}


def oip_error_body(message: str) -> dict[str, Any]:
    """The Open Inference Protocol (``/v2``) error JSON."""
    return {"error": message}
