"""The VAE's Serve deployment: it receives the HTTP request and runs the model.

Routes (full paths; the app is deployed twice, see :mod:`serve_app.app`):
``POST /v1/vae/{reconstruct,sample,variations,interpolate}`` (PNG, a grid for several images,
or base64 JSON) and the Open Inference Protocol under ``/v2/models/vae``
(:mod:`serve_app.oip_routes`). Reconstructions are batched; sampling, variations and
interpolations run one request at a time on the model thread.
"""

# No `from __future__ import annotations`: FastAPI must see real classes (e.g. `Request`).
from typing import Any

import numpy as np
import torch
from fastapi import Request
from starlette.responses import Response

from mve.images import preprocess, to_uint8_hwc
from serve_app import parsing as P
from serve_app.api import ERRORS, PNG_RESPONSES, current_server, image_body, new_app
from serve_app.errors import ApiError
from serve_app.loading import LoadedModel
from serve_app.model_server import ModelServer, model_ingress
from serve_app.schemas import (
    ImagesJSON,
    InterpolateParams,
    NoParams,
    SampleParams,
    VariationParams,
)

__all__ = ["app", "VAEServer"]

app = new_app("mve VAE")


def _server() -> "VAEServer":
    return current_server()


def _check_n(n: int, limit: int, what: str = "n") -> None:
    if n > limit:
        raise ApiError(422, "invalid_parameter", f"{what} must be <= {limit}")


async def _image_request(request: Request, params: type, count: int, what: str
                         ) -> "tuple[VAEServer, bool, list[np.ndarray], Any]":
    """The server, JSON-or-PNG, ``count`` decoded images and the validated options of a
    variations/interpolate request."""
    server = _server()
    as_json = P.wants_json(request)
    blobs, fields = await P.parse_images(request, server.limits)
    P.check_count(blobs, count, what)
    p = P.validate(params, fields)
    limit, name = ((server.limits.max_steps, "steps") if what == "interpolate"
                   else (server.limits.max_samples, "n"))
    _check_n(getattr(p, name), limit, name)
    return server, as_json, await server.decode(blobs), p


@app.post("/v1/vae/reconstruct", responses={**ERRORS, **PNG_RESPONSES},
          openapi_extra=image_body(ImagesJSON))
async def reconstruct(request: Request) -> Response:
    """VAE reconstructions of one or many images."""
    server = _server()
    as_json = P.wants_json(request)
    blobs, fields = await P.parse_images(request, server.limits)
    P.validate(NoParams, fields)
    model = server.current()
    y = await server.reconstruct(model, await server.decode(blobs))
    return P.render_images(to_uint8_hwc(y, model.preprocessing), model.id, as_json=as_json)


@app.post("/v1/vae/sample", responses={**ERRORS, **PNG_RESPONSES},
          openapi_extra={"requestBody": {"required": False, "content": {
              "application/json": {"schema": SampleParams.model_json_schema()}}}})
async def sample(request: Request) -> Response:
    """``n`` samples from the prior (JSON body or query: n, temperature, seed, steps)."""
    server = _server()
    as_json = P.wants_json(request)
    p = P.validate(SampleParams, await P.parse_params(request, server.limits))
    _check_n(p.n, server.limits.max_samples)
    return await server.generate("sample", as_json, lambda m: m.ckpt.model.sample(
        p.n, temperature=p.temperature, seed=p.seed, steps=p.steps))


@app.post("/v1/vae/variations", responses={**ERRORS, **PNG_RESPONSES},
          openapi_extra=image_body(VariationParams))
async def variations(request: Request) -> Response:
    """``n`` variations of one image (options: n, temperature, seed)."""
    server, as_json, (image,), p = await _image_request(request, VariationParams, 1,
                                                        "variations")

    def run(m: LoadedModel) -> torch.Tensor:
        x = preprocess([image], m.preprocessing)
        return m.ckpt.model.variations(x[0], p.n, temperature=p.temperature, seed=p.seed)
    return await server.generate("variations", as_json, run)


@app.post("/v1/vae/interpolate", responses={**ERRORS, **PNG_RESPONSES},
          openapi_extra=image_body(InterpolateParams))
async def interpolate(request: Request) -> Response:
    """``steps`` images between two images (options: steps, method)."""
    server, as_json, (a, b), p = await _image_request(request, InterpolateParams, 2,
                                                      "interpolate")

    def run(m: LoadedModel) -> torch.Tensor:
        x = preprocess([a, b], m.preprocessing)
        return m.ckpt.model.interpolate(x[0], x[1], p.steps, method=p.method)
    return await server.generate("interpolate", as_json, run, nrow=p.steps)


@model_ingress(app, "vae", max_ongoing=32, target_ongoing=8)
class VAEServer(ModelServer):
    """The conv VAE behind its own routes: batched reconstructions, generation, hot swap."""

    def _forward(self, model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        return model.ckpt.model.reconstruct(x).float()

    async def reconstruct(self, model: LoadedModel, images: list[np.ndarray]) -> torch.Tensor:
        """Model-space reconstructions (posterior mean) of decoded images."""
        return await self.predict(model, await self.prepare(model, images))

    async def generate(self, method: str, as_json: bool, fn: Any,
                       nrow: int | None = None) -> Response:
        """``fn(model)`` on the model thread, rendered as PNG or JSON images."""
        model = self.current()
        y = await self.compute(method, fn, model)
        return P.render_images(to_uint8_hwc(y, model.preprocessing), model.id,
                               as_json=as_json, nrow=nrow)

    answer_images = reconstruct
    answer_tensor = ModelServer.predict  # a model-space tensor goes straight to the batcher

    def oip_outputs(self, model: LoadedModel, answer: torch.Tensor) -> dict[str, Any]:
        return {"reconstruction": answer.numpy()}
