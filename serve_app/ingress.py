"""The HTTP ingress: a FastAPI app (OpenAPI at ``/docs``) in front of the model deployments.

Routes (``/v1`` errors are ``{"error": {"code", "message"}}``, ``/v2`` errors ``{"error": msg}``):

- ``GET /``: the web page; ``GET /v1/models``: what is loaded
- ``POST /v1/classify``; ``POST /v1/vae/{reconstruct,sample,variations,interpolate}``
- Open Inference Protocol v2: ``GET /v2``, ``/v2/health/{live,ready}``,
  ``/v2/models/{m}[/versions/{v}][/ready]``, ``POST /v2/models/{m}[/versions/{v}]/infer``

With an API key configured (``AppArgs.api_key_file`` or ``$MVE_API_KEY``) every inference and
model-metadata route needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; the page,
``/docs`` and the health routes stay open. A model that is not deployed answers 404, one that
does not answer in ``model_timeout_s`` 503. A model call whose replica dies mid-request is
retried on another replica (inference is idempotent), so killing a replica fails no request.
"""

# No `from __future__ import annotations`: Serve rebuilds the route signatures and FastAPI must
# see real classes (e.g. `Request`), not strings.
import asyncio
from pathlib import Path
from typing import Any

from fastapi import Request
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.responses import HTMLResponse, JSONResponse, Response

from mve import __version__
from serve_app import parsing as P
from serve_app.api import (
    ERRORS,
    PNG_RESPONSES,
    app,
    configure,
    image_body,
    load_api_key,
    logger,
)
from serve_app.errors import ApiError
from serve_app.images import decode_images, harden_pillow
from serve_app.metrics import IngressMetrics
from serve_app.oip import (
    HEADER_LENGTH,
    decompress_body,
    encode_infer_response,
    model_metadata,
    outputs_for,
    parse_infer_request,
)
from serve_app.schemas import (
    AppArgs,
    ClassifyJSON,
    ClassifyParams,
    ClassifyResponse,
    ImagesJSON,
    InterpolateParams,
    ModelInfo,
    ModelsResponse,
    NoParams,
    SampleParams,
    VariationParams,
)

__all__ = ["app", "Ingress"]

STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_MODELS = ("classifier", "vae")
# Retries of a model call whose replica died under it (see Ingress._call).
MODEL_CALL_ATTEMPTS = 3
_RETRY_BACKOFF_S = (0.05, 0.25)
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError)


def _unavailable(model: str) -> ApiError:
    return ApiError(503, "model_unavailable", f"the {model} is not answering; retry later",
                    headers={"Retry-After": "1"})


@serve.deployment(
    name="Ingress", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32})
@serve.ingress(app)
class Ingress:
    """HTTP front end; holds handles to the model deployments (None when not deployed)."""

    def __init__(self, classifier: Any, vae: Any, args: dict[str, Any]) -> None:
        self._args = AppArgs.model_validate(args)
        self._limits = self._args.limits()
        self._handles = {"classifier": classifier, "vae": vae}
        harden_pillow()
        api_key = load_api_key(self._args)
        self._metrics = IngressMetrics()
        configure(metrics=self._metrics, api_key=api_key)
        if api_key is None:
            logger.warning("mve ingress: no API key configured; inference routes are open")
        self._page = (STATIC / "index.html").read_text()
        self._static = {n: (STATIC / n).read_bytes() for n in _STATIC_TYPES}

    async def _call(self, model: str, method: str, *args: Any) -> Any:
        """Calls ``method`` on a replica of ``model``, within ``model_timeout_s`` in all.

        A call whose replica dies under it (killed, OOM, node lost: ``RayActorError``) is sent
        again, up to :data:`MODEL_CALL_ATTEMPTS` times in all: every model method the ingress
        calls is a pure function of its arguments (inference or metadata), and Serve's router
        has by then dropped the dead replica, so the retry lands on a live one. Nothing else is
        retried. A model that stays unreachable is a 503 with ``Retry-After``.
        """
        handle = self._handles.get(model)
        if handle is None:
            raise ApiError(404, "model_not_found", f"no {model} is deployed on this server")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._args.model_timeout_s
        attempt = 1
        while True:
            try:
                result = await asyncio.wait_for(getattr(handle, method).remote(*args),
                                                max(deadline - loop.time(), 0.001))
                break
            except RayTaskError as exc:
                if isinstance(exc.cause, ApiError):
                    raise exc.cause from None
                raise
            except _REPLICA_LOST as exc:
                backoff = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S)) - 1]
                if attempt >= MODEL_CALL_ATTEMPTS or loop.time() + backoff >= deadline:
                    raise _unavailable(model) from None
                reason = type(exc).__name__
                self._metrics.retried(model, reason)
                logger.warning("%s.%s: the replica was lost (%s); retrying on another "
                               "(attempt %d of %d)", model, method, reason, attempt + 1,
                               MODEL_CALL_ATTEMPTS)
                attempt += 1
                await asyncio.sleep(backoff)
            except (TimeoutError, BackPressureError, DeploymentUnavailableError):
                raise _unavailable(model) from None
        if isinstance(result, dict) and "error" in result:
            raise ApiError(*result["error"])
        return result

    async def _decode(self, blobs: list[bytes]) -> list[Any]:
        if sum(map(len, blobs)) <= 64 * 1024:
            return decode_images(blobs, self._limits)
        return await asyncio.to_thread(decode_images, blobs, self._limits)

    # -- page -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(self._page.replace("__BASE__", base),
                            headers={"Content-Security-Policy": _CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in self._static:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(self._static[name], media_type=_STATIC_TYPES[name])

    # -- /v1 --------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        """The loaded checkpoints: id, metrics, class names, preprocessing, swap status."""
        out = ModelsResponse(models=[])
        for name in _MODELS:
            if self._handles[name] is None:
                continue
            try:
                out.models.append(ModelInfo.model_validate(await self._call(name, "info")))
            except ApiError as exc:
                out.unavailable[name] = exc.message
        return out

    @app.post("/v1/classify", response_model=ClassifyResponse,
              responses=ERRORS, openapi_extra=image_body(ClassifyJSON))
    async def classify(self, request: Request) -> ClassifyResponse:
        """Top-k classes for one or many images (raw, multipart or base64 JSON)."""
        blobs, fields = await P.parse_images(request, self._limits)
        params = P.validate(ClassifyParams, fields)
        result = await self._call("classifier", "classify", await self._decode(blobs))
        return ClassifyResponse(checkpoint_id=result["checkpoint_id"],
                                predictions=P.top_k_predictions(
                                    result["probabilities"], result["class_names"], params.top_k))

    @app.post("/v1/vae/reconstruct", responses={**ERRORS, **PNG_RESPONSES},
              openapi_extra=image_body(ImagesJSON))
    async def reconstruct(self, request: Request) -> Response:
        """VAE reconstructions of one or many images."""
        as_json = P.wants_json(request)
        blobs, fields = await P.parse_images(request, self._limits)
        P.validate(NoParams, fields)
        result = await self._call("vae", "reconstruct", await self._decode(blobs))
        return P.render_images(result["images"], result["checkpoint_id"], as_json=as_json)

    @app.post("/v1/vae/sample", responses={**ERRORS, **PNG_RESPONSES},
              openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": SampleParams.model_json_schema()}}}})
    async def sample(self, request: Request) -> Response:
        """``n`` samples from the prior (JSON body or query: n, temperature, seed)."""
        as_json = P.wants_json(request)
        p = P.validate(SampleParams, await P.parse_params(request, self._limits))
        self._check_n(p.n)
        result = await self._call("vae", "sample", p.n, p.temperature, p.seed)
        return P.render_images(result["images"], result["checkpoint_id"], as_json=as_json)

    @app.post("/v1/vae/variations", responses={**ERRORS, **PNG_RESPONSES},
              openapi_extra=image_body(VariationParams))
    async def variations(self, request: Request) -> Response:
        """``n`` variations of one image (options: n, temperature, seed)."""
        as_json = P.wants_json(request)
        blobs, fields = await P.parse_images(request, self._limits)
        P.check_count(blobs, 1, "variations")
        p = P.validate(VariationParams, fields)
        self._check_n(p.n)
        (image,) = await self._decode(blobs)
        result = await self._call("vae", "variations", image, p.n, p.temperature, p.seed)
        return P.render_images(result["images"], result["checkpoint_id"], as_json=as_json)

    @app.post("/v1/vae/interpolate", responses={**ERRORS, **PNG_RESPONSES},
              openapi_extra=image_body(InterpolateParams))
    async def interpolate(self, request: Request) -> Response:
        """``steps`` images between two images (options: steps, method)."""
        as_json = P.wants_json(request)
        blobs, fields = await P.parse_images(request, self._limits)
        P.check_count(blobs, 2, "interpolate")
        p = P.validate(InterpolateParams, fields)
        if p.steps > self._limits.max_steps:
            raise ApiError(422, "invalid_parameter", f"steps must be <= {self._limits.max_steps}")
        a, b = await self._decode(blobs)
        result = await self._call("vae", "interpolate", a, b, p.steps, p.method)
        return P.render_images(result["images"], result["checkpoint_id"], as_json=as_json,
                               nrow=p.steps)

    def _check_n(self, n: int) -> None:
        if n > self._limits.max_samples:
            raise ApiError(422, "invalid_parameter", f"n must be <= {self._limits.max_samples}")

    # -- Open Inference Protocol v2 -----------------------------------------------------------

    @app.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        """OIP server metadata."""
        return {"name": "mve", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        """OIP liveness: the ingress answers."""
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(self) -> JSONResponse:
        """OIP readiness: every deployed model answers."""
        ok = True
        for name in _MODELS:
            if self._handles[name] is not None:
                ok &= await self._model_ready(name)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def _model_ready(self, name: str) -> bool:
        try:
            info = await asyncio.wait_for(self._handles[name].info.remote(), 5.0)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        return "error" not in info

    async def _info(self, model: str, version: str | None) -> dict[str, Any]:
        if model not in _MODELS:
            raise ApiError(404, "model_not_found", f"unknown model {model!r}; models are "
                           f"{[m for m in _MODELS if self._handles[m] is not None]}")
        info = await self._call(model, "info")
        if version not in (None, "", info["checkpoint_id"]):
            raise ApiError(404, "version_not_found", f"{model} serves version "
                           f"{info['checkpoint_id']}, not {version!r}")
        return info

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{model_version}")
    async def model_meta(self, model_name: str, model_version: str | None = None) -> dict:
        """OIP model metadata (inputs/outputs; the version is the checkpoint id)."""
        return model_metadata(model_name, await self._info(model_name, model_version))

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def model_ready(self, model_name: str, model_version: str | None = None) -> dict:
        """OIP model readiness."""
        await self._info(model_name, model_version)
        return {"name": model_name, "ready": True}

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{model_version}/infer")
    async def infer(self, model_name: str, request: Request,
                    model_version: str | None = None) -> Response:
        """OIP inference: FP32 ``input`` [N,3,H,W] (normalised) or BYTES ``image`` [N]."""
        if model_version:
            await self._info(model_name, model_version)
        elif model_name not in _MODELS:
            raise ApiError(404, "model_not_found", f"unknown model {model_name!r}")
        body = await P.read_body(request, self._limits.max_body_bytes)
        body = decompress_body(body, request.headers.get("content-encoding"),
                               self._limits.max_body_bytes)
        req = parse_infer_request(body, request.headers.get(HEADER_LENGTH), self._limits,
                                  model_name)
        if req.images is not None:
            images = await self._decode(req.images)
            method, args = ("classify", (images,)) if model_name == "classifier" else (
                "reconstruct", (images, True))
            result = await self._call(model_name, method, *args)
        else:
            result = await self._call(model_name, "infer_tensor", req.tensor)
        body, headers = encode_infer_response(model_name, result["checkpoint_id"], req,
                                              outputs_for(model_name, result))
        return Response(body, headers=headers)
