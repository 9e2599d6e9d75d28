"""The front application: everything that is not a model call (no model, no torch on the path).

Mounted at the root prefix, so it answers whatever no model application claims: the web page
and its static files, ``/docs`` (one OpenAPI document for every route of every app),
``GET /v1/models``, the server-wide Open Inference Protocol routes (``/v2``,
``/v2/health/{live,ready}``), and a 404 ``model_not_found`` for a model that is not deployed
(``/v1/classify`` without a classifier, ``/v2/models/foo``). It asks the model applications
through handles; a call whose replica dies under it is sent again (every model method it calls
is read-only), and a model that stays unreachable is reported, not fatal.
"""

# No `from __future__ import annotations`: FastAPI must see real classes (e.g. `Request`).
import asyncio
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.responses import HTMLResponse, JSONResponse, Response

from mve import __version__
from serve_app.api import current_server, new_app, setup_replica
from serve_app.errors import ApiError
from serve_app.families import MODELS, SERVED, served
from serve_app.schemas import FrontArgs, ModelInfo, ModelsResponse

__all__ = ["app", "Front"]

STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
# Swagger UI 5 and ReDoc 2 as the `fastapi-offline` package ships them (FastAPI's own pages load
# them from a CDN, so /docs stayed blank offline; Swagger UI 4 cannot read OpenAPI 3.1).
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MODEL_CALL_ATTEMPTS = 3  # a metadata call whose replica died is sent again, up to this often
_RETRY_BACKOFF_S = (0.05, 0.25)

app = new_app()


def _front() -> "Front":
    return current_server()


def _not_deployed(model: str) -> ApiError:
    return ApiError(404, "model_not_found", f"no {model} is deployed on this server")


@app.get("/", include_in_schema=False)
async def page(request: Request) -> HTMLResponse:
    base = request.scope.get("root_path", "").rstrip("/") + "/"
    return HTMLResponse(_front().page.replace("__BASE__", base),
                        headers={"Content-Security-Policy": _CSP})


@app.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    files = _front().static
    if name not in files:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return Response(files[name], media_type=_STATIC_TYPES[name])


@app.get("/v1/models", response_model=ModelsResponse)
async def models() -> ModelsResponse:
    """The loaded checkpoints: id, metrics, class names, preprocessing, swap status."""
    front = _front()
    out = ModelsResponse(models=[])
    for name in front.deployed:
        try:
            out.models.append(ModelInfo.model_validate(await front.info(name)))
        except ApiError as exc:
            out.unavailable[name] = exc.message
    return out


@app.get("/v2")
async def server_metadata() -> dict[str, Any]:
    """OIP server metadata."""
    return {"name": "mve", "version": __version__, "extensions": ["binary_tensor_data"]}


@app.get("/v2/health/live")
async def live() -> dict[str, bool]:
    """OIP liveness: the server answers."""
    return {"live": True}


@app.get("/v2/health/ready")
async def ready() -> JSONResponse:
    """OIP readiness: every application of every deployed model answers."""
    ok = await _front().all_ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


def _not_deployed_route(model: str) -> Any:
    async def not_deployed() -> Response:
        raise _not_deployed(model)
    return not_deployed


def _add_not_deployed_routes() -> None:
    """A family that is not deployed has no application claiming its ``/v1`` prefix, so its
    requests reach the front: answer them with a 404 that names the family."""
    for family in SERVED.values():
        route = _not_deployed_route(family.name)
        for path in (family.api_prefix, family.api_prefix + "/{rest:path}"):
            app.add_api_route(path, route, methods=["GET", "POST"], include_in_schema=False,
                              name=f"no_{family.name}")


_add_not_deployed_routes()


@app.api_route("/v2/models/{model_name}{rest:path}", methods=["GET", "POST"],
               include_in_schema=False)
async def unknown_model(model_name: str, rest: str) -> Response:
    if model_name in MODELS:
        raise _not_deployed(model_name)
    raise ApiError(404, "model_not_found", f"unknown model {model_name!r}; models are "
                   f"{list(_front().deployed)}")


def _merged_openapi() -> dict[str, Any]:
    """The front's OpenAPI document plus the routes of the model apps that are deployed."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        routes = list(app.routes)
        for model in _front().deployed:
            routes += served(model).app_module().app.routes
        app.openapi_schema = get_openapi(title=app.title, version=app.version,
                                         description=app.description, routes=routes)
    return app.openapi_schema


# One document for the routes of every application, served by explicit routes: Serve rebuilds
# the ingress app in the replica, so overriding `app.openapi` does not reach the served copy.
@app.get("/openapi.json", include_in_schema=False)
async def openapi() -> JSONResponse:
    return JSONResponse(_merged_openapi())


@app.get("/docs", include_in_schema=False)
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    assets = f"{root}/docs/assets"
    return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - docs",
                               oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon.png")


@app.get("/docs/assets/{name}", include_in_schema=False)
async def docs_asset(name: str) -> Response:
    """Swagger UI's and ReDoc's files from the installed ``fastapi-offline`` package, so the
    docs work without the CDN that FastAPI's default pages load them from (offline, air-gapped)."""
    if name not in _DOCS_ASSETS:
        raise ApiError(404, "not_found", f"no docs asset {name!r}")
    return Response(_front().docs_assets[name], media_type=_DOCS_ASSETS[name],
                    headers={"Cache-Control": "public, max-age=86400"})


@app.get("/docs/oauth2-redirect", include_in_schema=False)
async def docs_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@app.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
                          redoc_favicon_url=f"{root}/docs/assets/favicon.png",
                          with_google_fonts=False)


# Last: @serve.ingress takes the app's routes as they are when it runs.
@serve.deployment(
    name="Front", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    health_check_period_s=10)
@serve.ingress(app)
class Front:
    """The page, the docs, ``/v1/models`` and the server-wide OIP routes."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = FrontArgs.model_validate(args)
        self.deployed = {m: apps for m, apps in self.args.models.items() if apps}
        self.page = (STATIC / "index.html").read_text()
        self.static = {n: (STATIC / n).read_bytes() for n in _STATIC_TYPES}
        self.docs_assets = {n: (DOCS_ASSETS_DIR / n).read_bytes() for n in _DOCS_ASSETS}
        self._handles: dict[str, Any] = {}
        setup_replica(self.args, self, front=True)

    def _handle(self, app_name: str, model: str) -> Any:
        if app_name not in self._handles:
            self._handles[app_name] = serve.get_deployment_handle(
                served(model).deployment, app_name=app_name)
        return self._handles[app_name]

    async def info(self, model: str, app_name: str | None = None) -> dict[str, Any]:
        """``info()`` of a replica of ``model`` (its first app unless ``app_name``)."""
        handle = self._handle(app_name or self.deployed[model][0], model)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.args.model_timeout_s
        for attempt in range(1, MODEL_CALL_ATTEMPTS + 1):
            try:
                return await asyncio.wait_for(handle.info.remote(),
                                              max(deadline - loop.time(), 0.001))
            except (RayActorError, ReplicaUnavailableError):  # its replica died: ask another
                if attempt == MODEL_CALL_ATTEMPTS:
                    break
                await asyncio.sleep(_RETRY_BACKOFF_S[attempt - 1])
            except RayTaskError as exc:  # e.g. the replica has no model yet (503)
                if isinstance(exc.cause, ApiError):
                    raise exc.cause from None
                break
            except Exception:  # noqa: BLE001 - timeout, back-pressure, no replica: unavailable
                break
        raise ApiError(503, "model_unavailable", f"the {model} is not answering; retry later",
                       headers={"Retry-After": "1"})

    async def all_ready(self) -> bool:
        """Whether every app of every deployed model answers ``info`` within 5 s."""
        async def one(model: str, app_name: str) -> bool:
            try:
                await asyncio.wait_for(self._handle(app_name, model).info.remote(), 5.0)
                return True
            except Exception:  # noqa: BLE001 - any failure means not ready
                return False
        checks = [one(m, a) for m, apps in self.deployed.items() for a in apps]
        return all(await asyncio.gather(*checks))
