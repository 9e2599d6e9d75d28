"""The FastAPI apps' plumbing: error rendering, request metrics, API-key auth, the mount point.

Every Serve application of mve (the front and each model, see :mod:`serve_app.app`) builds its
FastAPI app with :func:`new_app`, which adds what is app-wide: exception handlers that turn
every error into JSON
(``{"error": {"code", "message"}}`` on ``/v1``, the OIP ``{"error": msg}`` on ``/v2``), an ASGI
middleware that counts requests by route template and sets ``X-Content-Type-Options: nosniff``,
and the API-key check (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, constant-time compare)
on every route but the page, the docs and the health checks. It runs before routing, so an
unauthenticated request never reaches a handler or has its body read, and a route added later
is protected by default (an allowlist of open paths, not a per-route dependency).

Routes are declared with their full public paths (``/v1/classify``, not ``/``): the middleware
sets the ASGI ``root_path`` to the app's mount point (``AppArgs.mount``, usually empty) instead
of the Serve route prefix, so the same routes work behind any route prefix.
"""

# No `from __future__ import annotations`: FastAPI must see real classes in signatures.
import hmac
import logging
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from mve import __version__
from serve_app.body_drain import DrainUnreadBody
from serve_app.errors import ApiError, error_body, oip_error_body
from serve_app.schemas import AppArgs, ErrorResponse

__all__ = ["new_app", "RUNTIME", "configure", "OPEN_PATHS", "ERRORS", "PNG_RESPONSES",
           "Gatekeeper", "key_ok", "load_api_key", "image_body", "app_path", "setup_replica",
           "current_server"]

logger = logging.getLogger("ray.serve")
# Per-replica state of the middleware and error handlers (one ingress replica per process).
RUNTIME = SimpleNamespace(metrics=None, api_key=None, mount="", server=None)


def configure(*, metrics: Any, api_key: str | None, mount: str = "",
              server: Any = None) -> None:
    """Sets the replica's metrics, API key, mount point and model server.

    Call this function rather than assigning ``RUNTIME`` attributes from the deployment class:
    Serve pickles the ``@serve.ingress`` class by value, so a global it touches directly is a
    copy, while module-level functions like this one are pickled by reference.
    """
    RUNTIME.metrics = metrics
    RUNTIME.api_key = api_key
    RUNTIME.mount = mount.rstrip("/")
    RUNTIME.server = server


def current_server() -> Any:
    """The replica's :class:`~serve_app.model_server.ModelServer` (set by ``configure``)."""
    if RUNTIME.server is None:
        raise ApiError(503, "model_not_ready", "this replica is still starting")
    return RUNTIME.server


def _route(scope: dict[str, Any]) -> str:
    return getattr(scope.get("route"), "path", None) or "unmatched"


# Routes that never need the API key: the page, the docs and the health checks. Everything else
# (including paths added later) is protected when a key is configured.
OPEN_PATHS = re.compile(r"^/(|static/[\w.-]+|docs|docs/oauth2-redirect|docs/assets/[\w.-]+|"
                        r"openapi\.json|redoc|v2|"
                        r"v2/health/(live|ready)|v2/models/[^/]+(/versions/[^/]+)?/ready)$")


def app_path(scope: dict[str, Any]) -> str:
    """The request path below the mount point (what the routes and ``OPEN_PATHS`` match)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def key_ok(headers: Headers, key: str) -> bool:
    """``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (constant-time compare)."""
    auth = headers.get("authorization", "")
    offered = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
    offered.append(headers.get("x-api-key", ""))
    return any(o and hmac.compare_digest(o.encode(), key.encode()) for o in offered)


class Gatekeeper:
    """ASGI middleware: API-key check (before routing or reading the body), request metrics by
    route template, and ``X-Content-Type-Options: nosniff`` on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        # Serve sets root_path to the app's route prefix; the routes carry full paths.
        scope["root_path"] = RUNTIME.mount
        try:
            path = app_path(scope)
            if (RUNTIME.api_key is not None and not OPEN_PATHS.match(path)
                    and not key_ok(Headers(scope=scope), RUNTIME.api_key)):
                response = _error_response(
                    path, 401, "unauthorized", "a valid API key is required: send "
                    "'Authorization: Bearer KEY' or 'X-API-Key: KEY'", "unauthorized",
                    {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            if RUNTIME.metrics is not None:
                RUNTIME.metrics.record(_route(scope), scope["method"], status,
                                       (time.perf_counter() - t0) * 1000)


def _error_response(path: str, status: int, code: str, message: str, route: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    if RUNTIME.metrics is not None and status < 500:
        RUNTIME.metrics.reject(route, code)
    oip = path == "/v2" or path.startswith("/v2/")
    body = oip_error_body(message) if oip else error_body(code, message)
    return JSONResponse(body, status_code=status, headers=headers)


def _error(request: Request, status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return _error_response(app_path(request.scope), status, code, message,
                           _route(request.scope), headers)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(request, exc.status, exc.code, exc.message, exc.headers)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error(request, 422, "invalid_parameter", msg)


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return _error(request, 500, "internal", "internal server error")


DESCRIPTION = ("Classify CIFAR-scale images and sample/reconstruct with a VAE; KServe Open "
               "Inference Protocol v2 under /v2.")


def new_app(title: str = "mve serving API") -> FastAPI:
    """A FastAPI app with mve's middleware and error handlers, without FastAPI's own docs
    routes (the front serves one document for all apps, :mod:`serve_app.front`)."""
    app = FastAPI(title=title, version=__version__, description=DESCRIPTION, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(Gatekeeper)
    app.add_middleware(DrainUnreadBody)  # outermost: also after Gatekeeper's 401
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_crash)
    return app


def setup_replica(args: AppArgs, server: Any, *, front: bool = False) -> None:
    """Per-replica HTTP set-up: Pillow hardening, the API key, request metrics, the mount and
    the object the routes of this replica call (``current_server()``)."""
    from serve_app.dataplane import bind_replica_grpc_to_loopback
    from serve_app.images import harden_pillow
    from serve_app.metrics import IngressMetrics  # imports Ray: replicas only

    bind_replica_grpc_to_loopback()
    harden_pillow()
    api_key = load_api_key(args)
    configure(metrics=IngressMetrics(), api_key=api_key, mount=args.mount, server=server)
    if api_key is None and front:  # said once, by the front, not by every model app
        logger.warning("mve: no API key configured; inference routes are open")


def load_api_key(args: AppArgs) -> str | None:
    """The API key from ``args.api_key_file``, else ``$<args.api_key_env>``, else None."""
    if args.api_key_file:
        path = Path(args.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"cannot read the API key file {path}: {exc}") from None
        if not key:
            raise RuntimeError(f"the API key file {path} is empty")
        return key
    return os.environ.get(args.api_key_env, "").strip() or None


def image_body(json_model: type) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an image route: raw PNG/JPEG, multipart or JSON."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    files = {"type": "object", "properties": {"file": {"type": "array", "items": {
        "type": "string", "format": "binary"}}}}
    return {"requestBody": {"required": True, "content": {
        "image/png": binary, "image/jpeg": binary, "multipart/form-data": {"schema": files},
        "application/json": {"schema": json_model.model_json_schema()}}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)}
PNG_RESPONSES = {200: {"content": {"image/png": {}, "application/json": {}},
              "description": "PNG (grid for several images) or JSON with base64 PNGs"}}
